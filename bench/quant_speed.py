"""Quantization throughput and peak RSS: swtool's RTN against gguf-py's `gguf.quants.quantize` (Q8_0, Q4_0).

Every measurement runs in its own child process; peak RSS is that child's
ru_maxrss (os.wait4). Linux keeps ru_maxrss across fork and exec, so the parent
stays small: it never imports torch, and even preparing the sources (export,
random checkpoint) runs in children. Throughput is MB (10^6 bytes) of *source* weights (the
stored bytes of the tensors being quantized) per second of wall time.

- `core`: the same tensors (those `swtool quantize` selects) are loaded one at a
  time and quantized; only the quantize call is timed, in wall seconds and in CPU
  seconds of the whole process (user+sys of all threads, `time.process_time`),
  which a busy machine disturbs much less. swtool: rtn.quantize
  (codes packed, scales, zero points), gguf-py: gguf.quants.quantize on the fp32
  numpy array (what its converter does).
- `cli`: the whole `swtool quantize` command (read, hash inputs, quantize, pack,
  write), wall time of the process.

Sources: SmolLM2-135M (fp16 HF export of the fixture GGUF) and a random
bf16 llama-shaped checkpoint of ~1.1B parameters (TinyLlama's shape), written to
--work with swtool's ShardedWriter and deleted at the end unless --keep.

    python bench/quant_speed.py [--skip-1b] [--work /tmp/swtool-quant-speed]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

LAST_CPU = 0.0
TINYLLAMA = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


def run_child(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child process; its user+sys CPU seconds go to LAST_CPU."""
    global LAST_CPU
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    out = proc.stdout.read().decode() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    LAST_CPU = usage.ru_utime + usage.ru_stime
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed ({status}): {' '.join(args)}")
    return wall, usage.ru_maxrss / 1024, out


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


def bench_source(label: str, source: Path, work: Path) -> list[dict]:
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
    for engine, kind, setting, env in configs:
        wall, rss, out = run_child([py, me, "--child", kind, str(source), setting], env)
        result = json.loads(out.strip().splitlines()[-1])
        row = {"source": label, "mode": "core", "engine": engine, "setting": setting, "mb_per_s": result["bytes"] / 1e6 / result["seconds"],
               "seconds": result["seconds"], "cpu_seconds": result["cpu"], "source_mb": result["bytes"] / 1e6, "peak_rss_mb": rss,
               "load": os.getloadavg()[0]}
        rows.append(row)
        note = f"  [{result['native']}]" if kind == "ours" else ""
        print(f"{label:>10} core {engine:<18} {setting:<5} {row['mb_per_s']:8.1f} MB/s  ({result['seconds']:.2f} s wall, {result['cpu']:.2f} s CPU "
              f"for {row['source_mb']:.0f} MB)  peak RSS {rss:.0f} MB  load {row['load']:.1f}{note}", file=sys.stderr)
    supers = work / "super.json"
    supers.write_text(json.dumps({"super_weights": [{"tensor": "model.layers.1.mlp.down_proj.weight", "row": 3, "col": 5}]}))
    source_mb = next(r["source_mb"] for r in rows if r["engine"] == "swtool")
    for setting in ("4/32", "4/512"):
        bits, block = setting.split("/")
        out_dir = work / f"out-{label}-{bits}-{block}"
        shutil.rmtree(out_dir, ignore_errors=True)
        wall, rss, _ = run_child([py, "-m", "swtool.cli", "quantize", str(source), "-o", str(out_dir), "--bits", bits, "--block", block, "--super", str(supers), "-q"])
        shutil.rmtree(out_dir, ignore_errors=True)
        row = {"source": label, "mode": "cli", "engine": "swtool quantize", "setting": setting, "mb_per_s": source_mb / wall, "seconds": wall,
               "cpu_seconds": LAST_CPU, "source_mb": source_mb, "peak_rss_mb": rss, "largest_fp32_mb": largest, "interpreter_mb": interp,
               "load": os.getloadavg()[0]}
        rows.append(row)
        verdict = "met" if rss < 2 * largest + interp else "NOT met"
        print(f"{label:>10} cli  swtool quantize  {setting:<5} {row['mb_per_s']:8.1f} MB/s  ({wall:.1f} s wall, {LAST_CPU:.1f} s CPU)  peak RSS {rss:.0f} MB "
              f"(target < 2 x {largest:.0f} + {interp:.0f} = {2 * largest + interp:.0f} MB: {verdict})", file=sys.stderr)
    return rows


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
        rows += bench_source("SmolLM2", smol, args.work)
    if not args.skip_1b:
        big = args.work / "random-1b"
        if not (big / "config.json").is_file():
            shutil.rmtree(big, ignore_errors=True)
            started = time.time()
            run_child([*me, "--make", "random-1b", str(big)])
            print(f"wrote the random 1.1B checkpoint in {time.time() - started:.0f} s", file=sys.stderr)
        try:
            rows += bench_source("random-1.1B", big, args.work)
        finally:
            if not args.keep:
                shutil.rmtree(big, ignore_errors=True)

    print("\n| source | mode | engine | setting (bits/block) | MB/s | s (wall) | CPU s | peak RSS MB | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = f"{r['cpu_seconds']:.2f}" if "cpu_seconds" in r else ""
        print(f"| {r['source']} | {r['mode']} | {r['engine']} | {r['setting']} | {r['mb_per_s']:.1f} | {r['seconds']:.2f} | {cpu} | {r['peak_rss_mb']:.0f} | {r['load']:.1f} |")
    for source in dict.fromkeys(r["source"] for r in rows):
        core = {(r["engine"], r["setting"]): r for r in rows if r["source"] == source and r["mode"] == "core"}
        pairs = [(("swtool", "8/32"), ("gguf-py", "Q8_0")), (("swtool", "4/32"), ("gguf-py", "Q4_0")), (("swtool", "4/512"), ("gguf-py", "Q4_0")),
                 (("swtool 1 thread", "4/32"), ("gguf-py", "Q4_0")), (("swtool torch path", "4/32"), ("gguf-py", "Q4_0"))]
        print(f"\n{source}, swtool / gguf-py (wall; CPU):")
        for ours, theirs in pairs:
            a, b = core[ours], core[theirs]
            print(f"  {ours[0]} {ours[1]} vs {theirs[0]} {theirs[1]}: {b['seconds'] / a['seconds']:.2f}x; {b['cpu_seconds'] / a['cpu_seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
