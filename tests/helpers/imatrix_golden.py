"""Regenerate tests/fixtures/imatrix/: importance matrices written by llama-imatrix itself on tiny random models.

    SWTOOL_LLAMA_CPP=/path/to/llama.cpp/build/bin python -m tests.helpers.imatrix_golden

Each case builds a tiny model with tests/tiny.py (fixed seed), converts it to F32 GGUF with
tests/gguf_tiny.py, writes TEXT to `text.txt` and runs llama-imatrix on it with a float32 KV
cache and no flash attention (so its arithmetic is float32 throughout, as swtool's is), in GGUF
and legacy .dat formats. `cases.json` records each command and the sha256 of the model file, so
the tests can tell a changed model generator (regenerate) from a changed swtool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

FIXTURES = TESTS / "fixtures" / "imatrix"
TEXT = " ".join(
    f"{word} {n * 7 % 13} {'alpha beta gamma delta'.split()[n % 4]}." for n, word in enumerate(("The quick brown fox jumps over the lazy dog and " * 4).split())
)
"""About 400 byte-level tokens: enough for several chunks of 32 to 40 tokens."""

BOS = 299
"""The tiny vocabulary's last spare id, made BOS in the llama case (so the first-token rule is exercised)."""

CASES = {
    # name: (family, seed, bos, llama-imatrix options)
    "llama": ("llama", 0, BOS, ["-c", "32", "-b", "64", "--chunks", "9"]),
    "llama-b32": ("llama", 0, BOS, ["-c", "40", "-b", "32"]),
    "mixtral": ("mixtral", 1, None, ["-c", "32", "-b", "32"]),
}
"""llama: two chunks per batch (split into equal micro-batches per sequence), BOS first in every chunk;
llama-b32: each 40-token chunk decoded as 32 + 8 tokens, the last 8 too few for llama-imatrix to collect (dense weights);
mixtral: routed experts (every token counts for the experts it is sent to), no BOS."""

COMMON = ["-t", "1", "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-ppl"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_file(family: str, seed: int, bos: int | None, folder: Path) -> Path:
    from tests.helpers.gguf_tiny import convert
    from tests.helpers.tiny import build

    build(family, folder / "hf", seed=seed)
    convert(folder / "hf", folder / "tiny.gguf", bos=bos)
    return folder / "tiny.gguf"


def main() -> None:
    binaries = Path(os.environ["SWTOOL_LLAMA_CPP"])
    FIXTURES.mkdir(parents=True, exist_ok=True)
    record = {}
    for name, (family, seed, bos, options) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model = model_file(family, seed, bos, folder)
            (folder / "text.txt").write_text(TEXT)
            for suffix, extra in ((".gguf", []), (".dat", ["--output-format", "dat"])):
                command = [str(binaries / "llama-imatrix"), "-m", "tiny.gguf", "-f", "text.txt", *options, *COMMON, *extra, "-o", "out" + suffix]
                run = subprocess.run(command, cwd=folder, capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(binaries)})
                if run.returncode:
                    raise SystemExit(f"{name}: llama-imatrix failed:\n{run.stderr[-3000:]}")
                if suffix == ".dat" and name != "llama":
                    continue
                shutil.copy(folder / ("out" + suffix), FIXTURES / (name + suffix))
            record[name] = {"family": family, "seed": seed, "bos": bos, "options": options + COMMON, "model_sha256": sha256(model)}
    (FIXTURES / "cases.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {FIXTURES}")


if __name__ == "__main__":
    main()
