# Shared set-up for scripts/demo and scripts/test: a virtual environment with swtool installed.
# It reuses a torch the base Python already has (--system-site-packages) and otherwise installs
# torch==2.13.0, so it never pulls a multi-GB CUDA build over a compatible torch already present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${SWTOOL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[$1]"
