# Shared set-up for scripts/demo and scripts/test: a virtual environment with swtool installed.
# It reuses a torch the base Python already has (--system-site-packages) and otherwise installs
# torch==2.13.0, so it never pulls a multi-GB CUDA build over a compatible torch already present.
# Each step says what it does on stderr; swtool's install is skipped when the environment was
# installed from this very pyproject.toml (its sha256 is kept in the environment).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${SWTOOL_VENV:-.venv}"
say() { echo "swtool set-up: $*" >&2; }
if [ ! -x "$VENV/bin/python" ]; then
    say "creating the environment $VENV"
    python3 -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
    say "installing torch 2.13.0 (CPU build, about 200 MB)"
    python -m pip install -q "torch==2.13.0"
fi
STAMP="$VENV/.swtool-installed-$1"
WANTED="$(sha256sum pyproject.toml | cut -d' ' -f1) $(pwd)"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANTED" ] && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('swtool') is None)" 2>/dev/null; then
    say "swtool and its [$1] dependencies already installed in $VENV (pyproject.toml unchanged)"
else
    say "installing swtool and its [$1] dependencies into $VENV"
    python -m pip install -q -e ".[$1]"
    echo "$WANTED" > "$STAMP"
fi
