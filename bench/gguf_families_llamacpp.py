"""llama.cpp against swtool on the GGUF files `swtool quantize --format gguf` writes for every family.

For each family a tiny random transformers model (tests/helpers/tiny.py, with one byte merge so llama.cpp
accepts the vocabulary) is written at F32, Q8_0 and Q4_0; llama-perplexity (-c 64) and swtool's
forward score the same file on the same text, and the largest relative difference of the running
perplexity per chunk is printed (with how many chunks llama.cpp printed).

    SWTOOL_LLAMA_CPP=/path/to/llama.cpp/build/bin python bench/gguf_families_llamacpp.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the tests' helpers package

from swtool.formats.open import open_checkpoint  # noqa: E402
from swtool.model.tokenizer import encode  # noqa: E402
from tests.helpers.clirun import invoke  # noqa: E402
from tests.helpers.families import GGUF_OPTIONS, WRITTEN, family_of  # noqa: E402
from tests.helpers.forward import chunk_perplexities  # noqa: E402
from tests.helpers.llamacpp import TEXT  # noqa: E402
from tests.helpers.tiny import add_byte_merge, build  # noqa: E402

TYPES = ("F32", "Q8_0", "Q4_0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the models (default: a temporary directory, removed)")
    args = parser.parse_args()
    folder = os.environ.get("SWTOOL_LLAMA_CPP")
    if not folder:
        sys.exit("set SWTOOL_LLAMA_CPP to llama.cpp's build/bin folder")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="swtool-gguf-families-"))
    text = root / "text.txt"
    root.mkdir(parents=True, exist_ok=True)
    text.write_text(TEXT)
    print("| family | " + " | ".join(TYPES) + " |")
    print("|---|" + "---|" * len(TYPES))
    try:
        for case in WRITTEN:
            directory = root / case
            build(family_of(case), directory / "hf", **GGUF_OPTIONS[case])
            add_byte_merge(directory / "hf")
            cells = []
            for type_name in TYPES:
                out = directory / f"{type_name}.gguf"
                result = invoke("quantize", directory / "hf", "-o", out, "--format", "gguf", "--type", type_name, "--no-keep-super", "-q", "--force")
                assert result.exit_code == 0, result.output
                run = subprocess.run(
                    [str(Path(folder) / "llama-perplexity"), "-m", str(out), "-f", str(text), "-c", "64", "-b", "64", "-t", "1"],
                    capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": folder},
                )
                theirs = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", run.stdout + run.stderr)]
                checkpoint = open_checkpoint(out)
                ours = chunk_perplexities(checkpoint, encode(checkpoint, TEXT), 64)
                worst = max(abs(a - b) / b for a, b in zip(ours, theirs)) if theirs else float("nan")
                cells.append(f"{worst:.1e} ({len(theirs)})")
            print(f"| {case} | " + " | ".join(cells) + " |", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
