"""Quantization throughput and peak RSS: swtool's RTN against gguf-py's `gguf.quants.quantize` (Q8_0, Q4_0).

Every measurement runs in its own child process under /usr/bin/time (peak RSS,
user + system CPU); the parent never imports torch, and even preparing the
sources (export, random checkpoint) runs in children. Throughput is MB (10^6 bytes) of *source* weights (the
stored bytes of the tensors being quantized) per second of wall time.

- `core`: the same tensors (those `swtool quantize` selects) are loaded one at a
  time and quantized; only the quantize call is timed, in wall seconds and in CPU
  seconds of the whole process (user+sys of all threads, `time.process_time`),
  which a busy machine disturbs much less. swtool: rtn.quantize
  (codes packed, scales, zero points), gguf-py: gguf.quants.quantize on the fp32
  numpy array (what its converter does).
- `cli`: the whole `swtool quantize` command (read, hash inputs, quantize, pack,
  write), wall time of the process, against the whole gguf-py process (`core` row
  gguf-py Q4_0: imports, load to float32, quantize) as the reference; a first run
  (the inputs' digests forgotten first, so the model is hashed) and a repeat run
  (digests remembered by swtool.digests, as when one model is quantized at several
  settings). With --baseline TREE the command also runs (first and repeat run) from
  that source tree (PYTHONPATH), in the same rounds, and its outputs must be byte for
  byte this tree's (provenance included); odd rounds run the baseline's pair first, so
  neither tree always follows the gguf-py process. Ratios to the reference are also
  given per round (each run against the gguf-py process of its own round), which
  cancels the machine's slow spells that a ratio of medians keeps.

Sources: SmolLM2-135M (fp16 HF export of the fixture GGUF) and a random
bf16 llama-shaped checkpoint of ~1.1B parameters (TinyLlama's shape), written to
--work with swtool's ShardedWriter and deleted at the end unless --keep.

    python bench/quant_speed.py [--skip-1b] [--work /tmp/swtool-quant-speed]
    python bench/quant_speed.py --only-1b --cli-only --repeat 3 --baseline /path/to/old/tree --keep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT))

from swtool.digests import cache_file, sha256_file  # noqa: E402  (the standard library only)

LAST_CPU = 0.0
TINYLLAMA = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


def run_child(args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child process; its user+sys CPU seconds go to LAST_CPU.

    Run under /usr/bin/time, which forks from a small process: a child forked from this one
    would report this process's resident high-water mark if it were larger (the kernel keeps
    the maximum across fork and exec). Dirty pages are written back first: three 0.85 GB outputs
    in a row crossed the kernel's write-back threshold, and the next run's writes were throttled
    (wall time up 0.5-1 s with less CPU)."""
    global LAST_CPU
    os.sync()  # no earlier output still waiting to be written back: each run's writes are its own
    with tempfile.NamedTemporaryFile("r") as stats:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-q", "-f", "%U %S %M", "-o", stats.name, *args], stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, cwd=cwd)
        wall = time.perf_counter() - started
        user, system, rss_kb = stats.read().split()[-3:]
    LAST_CPU = float(user) + float(system)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(args)}")
    return wall, int(rss_kb) / 1024, proc.stdout.decode()


def make_random_llama(directory: Path, seed: int = 0) -> None:
    """A bf16 llama checkpoint of TinyLlama's shape with random weights, streamed to disk one tensor at a time."""
    import torch

    from swtool.formats.hf.writer import PlannedTensor, ShardedWriter

    c = TINYLLAMA
    head_dim = c["hidden"] // c["heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], c["hidden"])}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c["hidden"],),
            p + "self_attn.q_proj.weight": (c["hidden"], c["hidden"]),
            p + "self_attn.k_proj.weight": (c["kv_heads"] * head_dim, c["hidden"]),
            p + "self_attn.v_proj.weight": (c["kv_heads"] * head_dim, c["hidden"]),
            p + "self_attn.o_proj.weight": (c["hidden"], c["hidden"]),
            p + "post_attention_layernorm.weight": (c["hidden"],),
            p + "mlp.gate_proj.weight": (c["intermediate"], c["hidden"]),
            p + "mlp.up_proj.weight": (c["intermediate"], c["hidden"]),
            p + "mlp.down_proj.weight": (c["hidden"], c["intermediate"]),
        })
    shapes["model.norm.weight"] = (c["hidden"],)
    shapes["lm_head.weight"] = (c["vocab"], c["hidden"])
    directory.mkdir(parents=True)
    writer = ShardedWriter(directory, [PlannedTensor(n, "BF16", s) for n, s in shapes.items()], {"format": "pt"}, 2 * 10**9)
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.write(name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c["hidden"], "intermediate_size": c["intermediate"],
        "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"], "num_key_value_heads": c["kv_heads"], "head_dim": head_dim,
        "vocab_size": c["vocab"], "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def child(kind: str, source: Path, setting: str) -> None:
    """Load each selected tensor, time only the quantize call; print seconds and source bytes as JSON."""
    import numpy as np
    import torch

    from swtool.formats.open import open_checkpoint
    from swtool.quantize import targets

    checkpoint = open_checkpoint(source)
    names = targets(checkpoint)
    seconds, cpu, nbytes = 0.0, 0.0, 0
    if kind == "gguf":
        import gguf

        qtype = gguf.GGMLQuantizationType[setting]
        for name in names:
            array = checkpoint.load(name, torch.float32).numpy()
            nbytes += array.size * checkpoint.native_dtype(name).itemsize
            started, started_cpu = time.perf_counter(), time.process_time()
            gguf.quants.quantize(array, qtype)
            seconds += time.perf_counter() - started
            cpu += time.process_time() - started_cpu
            del array
    else:
        from swtool.codecs.rtn import QuantSpec, parse_block, quantize
        from swtool.workers import parallel_chunks

        bits, block = setting.split("/")
        spec = QuantSpec(int(bits), parse_block(block))
        with parallel_chunks():  # as `swtool quantize` runs it
            for name in names:
                weight = checkpoint.load(name, checkpoint.native_dtype(name))
                nbytes += weight.numel() * weight.element_size()
                started, started_cpu = time.perf_counter(), time.process_time()
                quantize(weight, spec)
                seconds += time.perf_counter() - started
                cpu += time.process_time() - started_cpu
                del weight
    from swtool import native

    native.kernels()
    print(json.dumps({"seconds": seconds, "cpu": cpu, "bytes": nbytes, "threads": torch.get_num_threads(), "numpy": np.__version__, "native": native.status}))


def largest_tensor_fp32_mb(source: Path) -> float:
    _, _, out = run_child([sys.executable, str(Path(__file__).resolve()), "--largest", str(source)])
    return float(out.strip().splitlines()[-1])


def print_largest(source: Path) -> None:
    from swtool.formats.open import open_checkpoint

    checkpoint = open_checkpoint(source)
    print(max(math.prod(checkpoint.shape(n)) for n in checkpoint.names()) * 4 / 1e6)


def export_smollm2(directory: Path) -> None:
    import torch
    from fetch import smollm2_gguf

    from swtool.formats.hf.export import export_hf
    from swtool.formats.open import open_checkpoint

    directory.mkdir(parents=True)
    export_hf(open_checkpoint(smollm2_gguf()), directory, torch.float16)


def cli_row(label: str, engine: str, source: Path, out_dir: Path, setting: str, source_mb: float, env: dict[str, str]) -> dict:
    """One whole `swtool quantize SOURCE --bits B --block N --no-keep-super` process, its swtool the
    source tree that env's PYTHONPATH names (the output is kept for comparison)."""
    bits, block = setting.split("/")
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "swtool.cli", "quantize", str(source), "-o", str(out_dir), "--bits", bits, "--block", block, "--no-keep-super", "-q"]
    wall, rss, _ = run_child(argv, env, cwd="/")  # not a source tree: -m puts the working directory before PYTHONPATH
    return {"source": label, "mode": "cli", "engine": engine, "setting": setting, "mb_per_s": source_mb / wall, "seconds": wall,
            "cpu_seconds": LAST_CPU, "source_mb": source_mb, "peak_rss_mb": rss, "load": os.getloadavg()[0]}


def output_digests(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file written: outputs are compared by these, and deleted at once,
    so that every run starts with the same memory free (on this VM, writing into memory freed by a
    deleted output was up to 1 s faster than writing into memory untouched for a while)."""
    return {str(path.relative_to(directory)): sha256_file(path) for path in sorted(p for p in directory.rglob("*") if p.is_file())}


def bench_source(label: str, source: Path, work: Path, cli_only: bool = False, baseline: Path | None = None, repeat: int = 1) -> list[dict]:
    py = sys.executable
    me = str(Path(__file__).resolve())
    rows = []
    _, interp, _ = run_child([py, "-c", "import swtool.cli, swtool.quantize, gguf, torch"])
    largest = largest_tensor_fp32_mb(source)
    print(f"\n## {label}: largest tensor {largest:.0f} MB in fp32; interpreter with swtool, torch, gguf imported: {interp:.0f} MB RSS", file=sys.stderr)
    configs = [("gguf-py", "gguf", "Q8_0", {}), ("gguf-py", "gguf", "Q4_0", {}),
               ("swtool", "ours", "8/32", {}), ("swtool", "ours", "4/32", {}), ("swtool", "ours", "4/512", {}),
               ("swtool 1 thread", "ours", "4/32", {"OMP_NUM_THREADS": "1"}),
               ("swtool torch path", "ours", "4/32", {"SWTOOL_NATIVE": "0"})]
    if cli_only:
        configs = [c for c in configs if c[:3] == ("gguf-py", "gguf", "Q4_0")]
    pairs = [[("swtool quantize, first run", None), ("swtool quantize, repeat run", None)]]
    if baseline:
        pairs.append([("swtool quantize, baseline first run", baseline), ("swtool quantize, baseline repeat run", baseline)])
    for round_number in range(repeat):
        trees = [run for pair in (pairs if round_number % 2 == 0 else pairs[::-1]) for run in pair]  # neither tree always runs after gguf-py
        for engine, kind, setting, env in configs:
            wall, rss, out = run_child([py, me, "--child", kind, str(source), setting], env)
            result = json.loads(out.strip().splitlines()[-1])
            row = {"source": label, "mode": "core", "engine": engine, "setting": setting, "mb_per_s": result["bytes"] / 1e6 / result["seconds"],
                   "seconds": result["seconds"], "cpu_seconds": result["cpu"], "source_mb": result["bytes"] / 1e6, "peak_rss_mb": rss,
                   "load": os.getloadavg()[0], "process_seconds": wall, "process_cpu_seconds": LAST_CPU, "round": round_number}
            rows.append(row)
            note = f"  [{result['native']}]" if kind == "ours" else ""
            print(f"{label:>10} core {engine:<18} {setting:<5} {row['mb_per_s']:8.1f} MB/s  ({result['seconds']:.2f} s wall, {result['cpu']:.2f} s CPU "
                  f"for {row['source_mb']:.0f} MB; whole process {wall:.2f} s wall, {LAST_CPU:.2f} s CPU)  peak RSS {rss:.0f} MB  load {row['load']:.1f}{note}", file=sys.stderr)
        source_mb = next(r["source_mb"] for r in rows if r["mode"] == "core")
        for setting in ("4/32",) if cli_only else ("4/32", "4/512"):
            outputs: dict[str, dict[str, str]] = {}
            for engine, tree in trees:
                if engine.endswith("first run"):  # digests of the inputs not remembered from an earlier run (swtool.digests)
                    cache_file().unlink(missing_ok=True)
                out_dir = work / f"out-{label}-{setting.replace('/', '-')}"
                row = cli_row(label, engine, source, out_dir, setting, source_mb, {"PYTHONPATH": str(tree or ROOT)})
                outputs[engine] = output_digests(out_dir)
                shutil.rmtree(out_dir, ignore_errors=True)
                row.update(largest_fp32_mb=largest, interpreter_mb=interp, round=round_number)
                rows.append(row)
                verdict = "met" if row["peak_rss_mb"] < 2 * largest + interp else "NOT met"
                print(f"{label:>10} cli  {engine:<28} {setting:<5} {row['mb_per_s']:8.1f} MB/s  ({row['seconds']:.2f} s wall, {row['cpu_seconds']:.2f} s CPU)  "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB (target < 2 x {largest:.0f} + {interp:.0f} = {2 * largest + interp:.0f} MB: {verdict})", file=sys.stderr)
            if baseline:
                same = all(digests == outputs["swtool quantize, baseline first run"] for digests in outputs.values())
                print(f"{label:>10} cli  outputs of this tree (first and repeat run) and the baseline byte-identical: {same}", file=sys.stderr)
                if not same:
                    raise SystemExit("the two trees wrote different bytes")
    return rows


def round_ratios(rows: list[dict], source: str, engine: str, setting: str) -> str:
    """Median (and range) over rounds of this command's wall time / the gguf-py Q4_0 process's in the same
    round: a slow spell of the machine moves both, so it cancels here and not in a ratio of medians."""
    reference = {r["round"]: r["process_seconds"] for r in rows if r["source"] == source and r["mode"] == "core" and (r["engine"], r["setting"]) == ("gguf-py", "Q4_0")}
    ratios = sorted(r["seconds"] / reference[r["round"]] for r in rows if r["source"] == source and r["mode"] == "cli" and (r["engine"], r["setting"]) == (engine, setting))
    return f"median {statistics.median(ratios):.2f}x (from {ratios[0]:.2f}x to {ratios[-1]:.2f}x, {len(ratios)} rounds)"


def median_row(rows: list[dict]) -> dict:
    """The first of rows measuring the same thing, its timings replaced by their medians."""
    row = dict(rows[0])
    for key in ("seconds", "cpu_seconds", "peak_rss_mb", "process_seconds", "process_cpu_seconds", "mb_per_s", "load"):
        if key in row:
            row[key] = statistics.median(r[key] for r in rows)
    row["runs"] = len(rows)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SOURCE", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--largest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("WHAT", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--only-1b", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/swtool-quant-speed"))
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the random 1B checkpoint")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cli-only", action="store_true", help="only the whole-command rows and their gguf-py reference")
    parser.add_argument("--baseline", type=Path, help="also run the command from this source tree, interleaved, outputs compared")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every measurement (medians reported)")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.child[2])
        return
    if args.largest:
        print_largest(args.largest)
        return
    if args.make:
        (export_smollm2 if args.make[0] == "smollm2" else make_random_llama)(Path(args.make[1]))
        return

    me = [sys.executable, str(Path(__file__).resolve())]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    if not args.only_1b:
        smol = args.work / "smollm2-fp16"
        if not (smol / "config.json").is_file():
            shutil.rmtree(smol, ignore_errors=True)
            run_child([*me, "--make", "smollm2", str(smol)])
        rows += bench_source("SmolLM2", smol, args.work, args.cli_only, args.baseline, args.repeat)
    if not args.skip_1b:
        big = args.work / "random-1b"
        if not (big / "config.json").is_file():
            shutil.rmtree(big, ignore_errors=True)
            started = time.time()
            run_child([*me, "--make", "random-1b", str(big)])
            print(f"wrote the random 1.1B checkpoint in {time.time() - started:.0f} s", file=sys.stderr)
        try:
            rows += bench_source("random-1.1B", big, args.work, args.cli_only, args.baseline, args.repeat)
        finally:
            if not args.keep:
                shutil.rmtree(big, ignore_errors=True)

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["mode"], r["engine"], r["setting"]), []).append(r)
    medians = [median_row(group) for group in groups.values()]
    print("\n| source | mode | engine | setting (bits/block) | MB/s | s (wall) | CPU s | whole process s | peak RSS MB | load | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in medians:
        process = f"{r['process_seconds']:.2f}" if "process_seconds" in r else f"{r['seconds']:.2f}"
        print(f"| {r['source']} | {r['mode']} | {r['engine']} | {r['setting']} | {r['mb_per_s']:.1f} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
              f"{process} | {r['peak_rss_mb']:.0f} | {r['load']:.1f} | {r['runs']} |")
    for source in dict.fromkeys(r["source"] for r in medians):
        core = {(r["engine"], r["setting"]): r for r in medians if r["source"] == source and r["mode"] == "core"}
        cli = {(r["engine"], r["setting"]): r for r in medians if r["source"] == source and r["mode"] == "cli"}
        reference = core[("gguf-py", "Q4_0")]
        print(f"\n{source}, whole swtool quantize process / whole gguf-py Q4_0 process (load + quantize, {reference['process_seconds']:.2f} s):")
        for (engine, setting), r in cli.items():
            print(f"  {engine} {setting}: {r['seconds'] / reference['process_seconds']:.2f}x wall, {r['cpu_seconds'] / reference['process_cpu_seconds']:.2f}x CPU "
                  f"(ratio of medians); per round {round_ratios(rows, source, engine, setting)}")
        if ("swtool quantize, baseline first run", "4/32") in cli:
            for run in ("first run", "repeat run"):
                new, old = cli[(f"swtool quantize, {run}", "4/32")], cli[(f"swtool quantize, baseline {run}", "4/32")]
                print(f"  this tree / baseline, {run}: {new['seconds'] / old['seconds']:.2f}x wall, {new['cpu_seconds'] / old['cpu_seconds']:.2f}x CPU")
        if len(core) < 2:
            continue
        pairs = [(("swtool", "8/32"), ("gguf-py", "Q8_0")), (("swtool", "4/32"), ("gguf-py", "Q4_0")), (("swtool", "4/512"), ("gguf-py", "Q4_0")),
                 (("swtool 1 thread", "4/32"), ("gguf-py", "Q4_0")), (("swtool torch path", "4/32"), ("gguf-py", "Q4_0"))]
        print(f"\n{source}, quantize calls only, swtool / gguf-py (wall; CPU):")
        for ours, theirs in pairs:
            a, b = core[ours], core[theirs]
            print(f"  {ours[0]} {ours[1]} vs {theirs[0]} {theirs[1]}: {b['seconds'] / a['seconds']:.2f}x; {b['cpu_seconds'] / a['cpu_seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(medians, indent=2) + "\n")


if __name__ == "__main__":
    main()
