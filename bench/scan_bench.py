"""Speed and memory of `swtool scan` on a realistic-size random Llama checkpoint, against a plain read and transformers.

    python bench/scan_bench.py --preset 1.1b          # ~2.2 GB checkpoint, also scans an 11-layer twin
    python bench/scan_bench.py --preset 7b --delete   # ~13.5 GB checkpoint under /tmp, deleted afterwards
    python bench/scan_bench.py --repeat 3             # every command 3 times, interleaved; medians reported

1. Writes a random Llama-shaped checkpoint (bf16, normal std 0.02, norms 1,
   sharded with an index, byte-level tokenizer) one tensor at a time through
   swtool's streaming `ShardedWriter`, with super weights planted much as in
   tests/helpers/tiny.py: W_down[row, col] large, and gate/up rows `col` made to give
   channel `col` a big input (see CARRIER_CHANNEL, TRIGGER and FEED).
2. Runs each tool in its own child process under /usr/bin/time, which takes
   wall time, CPU time and peak RSS from the operating system: `cat` of every
   file (the plain read), `swtool scan DIR --json`, and transformers loading the
   model and running the prompt with forward hooks on every down_proj
   (bench/transformers_scan.py). Each runs cold (the checkpoint's pages evicted
   from the page cache with posix_fadvise DONTNEED, which needs no root and
   touches nobody else's cache; the resident fraction is measured with mincore
   and printed) and then warm (right after a full read).
3. Checks that the scan reports exactly the planted super weights, and prints
   the ratios the issue sets targets for.

Run one benchmark at a time; it is meant for a quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from swtool.formats.atomic import atomic_output
from swtool.formats.hf.writer import PlannedTensor, ShardedWriter, parse_size

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fixtures"))

Coord = tuple[int, int, int]

PRESETS: dict[str, dict] = {
    # TinyLlama-1.1B's shape.
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        planted=[(1, 1365, 4111), (7, 300, 2900)],
    ),
    # Llama-2-7B's shape; the first planted weight sits where Llama-7B's real one is.
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        planted=[(2, 3968, 7003), (9, 1512, 2233)],
    ),
}
STD = 0.02
CARRIER_CHANNEL, CARRIER_VALUE = 7, 8.0
"""Every token's embedding has CARRIER_VALUE in this channel, a hidden dimension that all tokens share
(as trained models have), so the first planted weight's input can fire on every token of any prompt."""
TRIGGER_PER_2048 = 3.0
"""gate/up[col, CARRIER_CHANNEL] of the first planted weight, per 2048 hidden channels: x[:, col] at its
down_proj input is then ~175 on every token (1.1B). Scaled with the width because the residual stream's
RMS grows with it at std 0.02, which dilutes the carrier after the norm (at 3.0 the 7B's spike was 90x
its layer's median, under the scan's 100x)."""
SUPER_VALUE = 8.0
"""W_down[row, col] of the first planted super weight (the other weights are ~0.02)."""
FEED = 1.0
FED_VALUE = 32.0
"""Later planted weights are fed by the previous one's super activation: gate/up[col, previous row] = FEED,
and W_down[row, col] = FED_VALUE. They fire on the same tokens, as chained massive activations do in
real models, so that zeroing either one changes the prediction of those tokens."""


# -- writing the checkpoint -----------------------------------------------------


def hf_config(spec: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "vocab_size": spec["vocab_size"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": None,
        "eos_token_id": None,
    }


def tensor_plan(spec: dict) -> list[PlannedTensor]:
    h, i, v = spec["hidden_size"], spec["intermediate_size"], spec["vocab_size"]
    kv = spec["num_key_value_heads"] * (h // spec["num_attention_heads"])
    plan = [PlannedTensor("model.embed_tokens.weight", "BF16", (v, h))]
    for layer in range(spec["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        plan += [
            PlannedTensor(p + "input_layernorm.weight", "BF16", (h,)),
            PlannedTensor(p + "self_attn.q_proj.weight", "BF16", (h, h)),
            PlannedTensor(p + "self_attn.k_proj.weight", "BF16", (kv, h)),
            PlannedTensor(p + "self_attn.v_proj.weight", "BF16", (kv, h)),
            PlannedTensor(p + "self_attn.o_proj.weight", "BF16", (h, h)),
            PlannedTensor(p + "post_attention_layernorm.weight", "BF16", (h,)),
            PlannedTensor(p + "mlp.gate_proj.weight", "BF16", (i, h)),
            PlannedTensor(p + "mlp.up_proj.weight", "BF16", (i, h)),
            PlannedTensor(p + "mlp.down_proj.weight", "BF16", (h, i)),
        ]
    return plan + [PlannedTensor("model.norm.weight", "BF16", (h,)), PlannedTensor("lm_head.weight", "BF16", (v, h))]


def make_tensor(planned: PlannedTensor, seed: int, planted: list[Coord]) -> torch.Tensor:
    """One tensor, generated alone (deterministic per name), with any planted super weight applied."""
    if len(planned.shape) == 1:
        return torch.ones(planned.shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(planned.shape, generator=generator, dtype=torch.float32).mul_(STD)
    if planned.name == "model.embed_tokens.weight":
        weight[:, CARRIER_CHANNEL] = CARRIER_VALUE
    for index, (layer, row, col) in enumerate(planted):
        p = f"model.layers.{layer}.mlp."
        if planned.name in (p + "gate_proj.weight", p + "up_proj.weight"):
            source = CARRIER_CHANNEL if index == 0 else planted[index - 1][1]
            weight[col, source] = TRIGGER_PER_2048 * planned.shape[1] / 2048 if index == 0 else FEED
        elif planned.name == p + "down_proj.weight":
            weight[row, col] = SUPER_VALUE if index == 0 else FED_VALUE
    return weight.to(torch.bfloat16)


def write_checkpoint(directory: Path, spec: dict, max_shard: str, seed: int = 0) -> float:
    """Write the checkpoint one tensor at a time; return the seconds it took. Reused when already there."""
    stamp = {k: v for k, v in spec.items()} | {"std": STD, "value": SUPER_VALUE, "carrier": [CARRIER_CHANNEL, CARRIER_VALUE], "trigger_per_2048": TRIGGER_PER_2048, "feed": FEED, "fed_value": FED_VALUE, "tokenizer": "bpe-wiki-2MB", "seed": seed, "max_shard": max_shard}
    marker = directory / "bench.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(stamp)):
        return 0.0
    start = time.perf_counter()
    plan = tensor_plan(spec)
    with atomic_output(directory, directory=True, force=True) as temp:
        writer = ShardedWriter(temp, plan, {"format": "pt"}, max_shard_bytes=parse_size(max_shard))
        for index, planned in enumerate(plan):
            writer.write(planned.name, make_tensor(planned, seed * 100_003 + index, spec["planted"]))
        writer.close()
        (temp / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
        write_tokenizer(temp, spec["vocab_size"])
        for file in temp.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        (temp / "bench.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return time.perf_counter() - start


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on 2 MB of Wikipedia (fixtures/fetch.py): the default prompt is then
    11 tokens, as with real tokenizers (SmolLM2's gives 9), not 39 single bytes. The forward's cost
    is proportional to the token count, so this matters for every time in the benchmark."""
    from fetch import wiki_text
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(wiki_text(2_000_000).split("\n"), trainer)
    tokenizer.save(str(directory / "tokenizer.json"))


def parameter_count(spec: dict) -> int:
    return sum(math.prod(t.shape) for t in tensor_plan(spec))


# -- page cache -----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def weight_files(directory: Path) -> list[Path]:
    """Safetensors shards, or GGUF files (bench/gguf_vocab_scan.py measures with this module's tools)."""
    return sorted([*directory.glob("*.safetensors"), *directory.glob("*.gguf")])


def evict(directory: Path) -> None:
    """Drop this checkpoint's pages (only these) from the page cache."""
    for file in directory.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(directory: Path) -> float:
    """Fraction of the weight files' pages in the page cache (mincore on a read-only map touches nothing)."""
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for file in weight_files(directory):
        mapped = np.memmap(file, dtype=np.uint8, mode="r")
        pages = (len(mapped) + page - 1) // page
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(mapped.ctypes.data), ctypes.c_size_t(len(mapped)), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident += sum(b & 1 for b in bytes(vector))
        total += pages
        del mapped
    return resident / max(total, 1)


# -- measuring a child ----------------------------------------------------------


@dataclass
class Run:
    tool: str
    cache: str
    """'cold' or 'warm'."""
    resident_before: float
    wall_s: float
    cpu_s: float
    """User plus system CPU seconds of the child."""
    peak_rss_mb: float
    status: int
    load_before: float
    """1-minute load average when the run started (the machine is shared)."""
    output: str = ""
    walls: list[float] | None = None
    """Every run's wall time, where this Run holds the medians of several."""


def medians(runs: list[Run]) -> list[Run]:
    """One Run per (tool, cache), in first-seen order: median wall, CPU and peak RSS of its runs."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.tool, run.cache), []).append(run)
    return [
        replace(
            group[0],
            wall_s=statistics.median(r.wall_s for r in group),
            cpu_s=statistics.median(r.cpu_s for r in group),
            peak_rss_mb=statistics.median(r.peak_rss_mb for r in group),
            status=max(r.status for r in group),
            load_before=statistics.median(r.load_before for r in group),
            walls=[r.wall_s for r in group],
        )
        for group in groups.values()
    ]


TIME = "/usr/bin/time"
PIN: list[str] = []
"""`taskset -c CPUS` before every measured command (--cpus): a two-core machine's figures on a bigger one."""


def measure(tool: str, argv: list[str], directory: Path, cache: str) -> Run:
    """Run argv under /usr/bin/time and take its wall clock, CPU time and peak RSS.

    Not os.wait4 on our own child: a child forked from this process inherits its
    resident-set high-water mark across exec (the kernel keeps the maximum), so it
    would report the benchmark's own memory; /usr/bin/time forks from a small process.
    """
    if cache == "cold":
        evict(directory)
    resident = resident_fraction(directory)
    load = os.getloadavg()[0]
    with tempfile.NamedTemporaryFile("r") as stats, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        status = subprocess.call([TIME, "-q", "-f", "%e %U %S %M", "-o", stats.name, *PIN, *argv], stdout=out, stderr=err)
        wall, user, system, rss_kb = stats.read().split()[-4:]
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if status != 0:
            sys.stderr.write(err.read().decode()[-3000:])
    run = Run(tool, cache, resident, float(wall), float(user) + float(system), int(rss_kb) / 1024, status, load, text)
    print(
        f"  {tool:<26} {cache:<5} (page cache {resident:4.0%}, load {load:4.1f}): {run.wall_s:7.1f} s wall, "
        f"{run.cpu_s:7.1f} s CPU, peak RSS {run.peak_rss_mb:7.0f} MB, exit {status}",
        flush=True,
    )
    return run


CACHES = ["cold", "warm"]


def cold_and_warm(tool: str, argv: list[str], directory: Path) -> list[Run]:
    return [measure(tool, argv, directory, cache) for cache in CACHES]


def swtool_command() -> list[str]:
    script = Path(sys.executable).parent / "swtool"
    return [str(script)] if script.exists() else [sys.executable, "-m", "swtool.cli"]


def mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


# -- the benchmark --------------------------------------------------------------


def check_scan(run: Run, planted: list[Coord]) -> tuple[bool, list[Coord]]:
    """Whether the scan examined exactly the planted weights to the end: verified by perplexity
    (`ppl_ratio` set), or, from a scan without verification (--baseline), reported as super weights.

    The random model's perplexity does not depend on its planted weights (their ratio is near 1),
    so they are not super weights; what the benchmark needs is that their verification was paid for.
    """
    if run.status != 0:
        return False, []
    doc = json.loads(run.output)
    verified = [w for w in doc["candidates"] if w.get("ppl_ratio") is not None] if "verification" in doc else doc["super_weights"]
    found = [(w["layer"], w["row"], w["col"]) for w in verified]
    return sorted(found) == sorted(planted), found


def transformers_plan(spec: dict, dtypes: list[str]) -> list[tuple[str, str | None]]:
    """(dtype, reason to skip or None): a load whose weights alone exceed what is free would swap or be killed."""
    params = parameter_count(spec)
    plans = []
    for dtype in dtypes:
        need = params * (4 if dtype == "fp32" else 2)
        if need > mem_total_bytes():
            plans.append((dtype, f"needs {need / 1e9:.1f} GB for the weights alone; the machine has {mem_total_bytes() / 1e9:.1f} GB RAM"))
        elif need * 1.2 > mem_available_bytes():
            plans.append((dtype, f"needs ~{need * 1.2 / 1e9:.1f} GB; only {mem_available_bytes() / 1e9:.1f} GB available now (shared machine)"))
        else:
            plans.append((dtype, None))
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="1.1b")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "swtool-bench")
    parser.add_argument("--max-shard", default="1GB")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--depth-check", action=argparse.BooleanOptionalAction, default=None,
                        help="also scan a twin with half the layers (default: on for 1.1b)")
    parser.add_argument("--transformers", default="fp32,bf16", help="comma-separated dtypes for the reference, or 'none'")
    parser.add_argument("--caches", default="cold,warm", help="which runs to make: cold, warm or both (warm right after cold)")
    parser.add_argument("--delete", action="store_true", help="delete the written checkpoints at the end")
    parser.add_argument("--json-out", type=Path, help="also write every measurement here")
    parser.add_argument("--repeat", type=int, default=1, help="measure every command this many times (interleaved) and report medians")
    parser.add_argument("--cpus", help="run every measured command on these CPUs only (taskset -c), e.g. 0,1")
    parser.add_argument("--baseline", type=Path, help="also scan with the swtool package in this source tree (PYTHONPATH), interleaved: old code vs new, side by side")
    args = parser.parse_args()
    if args.cpus:
        PIN[:] = ["taskset", "-c", args.cpus]

    CACHES[:] = args.caches.split(",")
    spec = dict(PRESETS[args.preset])
    if args.layers:
        spec["num_hidden_layers"] = args.layers
    depth_check = args.depth_check if args.depth_check is not None else args.preset == "1.1b"
    name = f"{args.preset}-{spec['num_hidden_layers']}l"
    directory = args.dir / name
    params = parameter_count(spec)
    print(f"{name}: {params / 1e9:.2f} B parameters, {params * 2 / 1e9:.1f} GB bf16, planted {spec['planted']}", flush=True)
    free = shutil.disk_usage(args.dir if args.dir.exists() else args.dir.parent).free
    if free < params * 2 * (1.6 if depth_check else 1.1):
        sys.exit(f"not enough disk under {args.dir}: {free / 1e9:.1f} GB free")
    args.dir.mkdir(parents=True, exist_ok=True)
    seconds = write_checkpoint(directory, spec, args.max_shard)
    shards = weight_files(directory)
    print(f"  wrote {len(shards)} shards in {seconds:.0f} s" if seconds else f"  reusing {directory}", flush=True)

    twin_dir = None
    if depth_check:
        twin = dict(spec, num_hidden_layers=spec["num_hidden_layers"] // 2)
        twin_dir = args.dir / f"{args.preset}-{twin['num_hidden_layers']}l"
        if any(layer >= twin["num_hidden_layers"] for layer, _, _ in twin["planted"]):
            sys.exit("a planted weight lies beyond the half-depth twin")
        write_checkpoint(twin_dir, twin, args.max_shard)

    cat = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, shards)]
    skipped: dict[str, str] = {}
    plan = [("read (cat)", cat, directory), ("swtool scan", [*swtool_command(), "scan", str(directory), "--json"], directory)]
    if args.baseline:
        plan.append(("swtool scan, baseline", ["env", f"PYTHONPATH={args.baseline.resolve()}", *swtool_command(), "scan", str(directory), "--json"], directory))
    if args.transformers != "none":
        for dtype, reason in transformers_plan(spec, args.transformers.split(",")):
            if reason:
                skipped[f"transformers {dtype}"] = reason
                print(f"  transformers {dtype}: skipped, {reason}", flush=True)
                continue
            plan.append((f"transformers {dtype}", [sys.executable, str(HERE / "transformers_scan.py"), str(directory), "--dtype", dtype], directory))
    twin_plan = []
    if twin_dir is not None:
        twin_plan.append((f"swtool scan {spec['num_hidden_layers'] // 2} layers", [*swtool_command(), "scan", str(twin_dir), "--json"], twin_dir))
    all_runs: list[Run] = []
    for round_number in range(args.repeat):
        if args.repeat > 1:
            print(f"  round {round_number + 1} of {args.repeat}", flush=True)
        for tool, argv, where in plan + twin_plan:  # rounds interleave the tools, so a slow spell of a shared machine hits them all
            all_runs += cold_and_warm(tool, argv, where)
    runs = medians([r for r in all_runs if r.tool in {tool for tool, _, _ in plan}])
    twin_runs = medians([r for r in all_runs if r.tool in {tool for tool, _, _ in twin_plan}])
    for run in all_runs:
        if run.tool.startswith("swtool scan") and not check_scan(run, [tuple(c) for c in spec["planted"]])[0]:
            print(f"  a {run.cache} scan did NOT find the planted weights exactly", flush=True)

    report(name, spec, runs, twin_runs, skipped)
    if args.json_out:
        args.json_out.write_text(json.dumps({"preset": name, "spec": spec, "runs": [asdict(r) | {"output": None} for r in all_runs], "skipped": skipped}, indent=2) + "\n")
    if args.delete:
        shutil.rmtree(directory)
        if twin_dir is not None:
            shutil.rmtree(twin_dir)


def report(name: str, spec: dict, runs: list[Run], twin_runs: list[Run], skipped: dict[str, str]) -> None:
    by = {(r.tool, r.cache): r for r in runs + twin_runs}
    print(f"\n{name}: {spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}, intermediate {spec['intermediate_size']}")
    print(f"| {'run':<26} | cache | wall s | CPU s | peak RSS MB | load | wall s of each run |")
    print(f"|{'-' * 28}|-------|--------|-------|-------------|------|--------------------|")
    for r in runs + twin_runs:
        each = " ".join(f"{w:.1f}" for w in r.walls or [r.wall_s])
        print(f"| {r.tool:<26} | {r.cache:<5} | {r.wall_s:6.1f} | {r.cpu_s:5.1f} | {r.peak_rss_mb:11.0f} | {r.load_before:4.1f} | {each} |")
    for tool, reason in skipped.items():
        print(f"| {tool:<26} | skipped: {reason}")
    for cache in CACHES:
        scan = by[("swtool scan", cache)]
        ok, found = check_scan(scan, [tuple(c) for c in spec["planted"]])
        print(f"\n[{cache}] planted {spec['planted']}: {'FOUND exactly' if ok else 'NOT found'} (scan reported {found})")
        read = by[("read (cat)", cache)]
        print(f"[{cache}] scan time / plain read time = {scan.wall_s / read.wall_s:.2f} (target <= 3)")
        print(f"[{cache}] scan CPU s / plain read wall s = {scan.cpu_s / read.wall_s:.2f} (what a quiet machine would give)")
        base = by.get(("swtool scan, baseline", cache))
        if base is not None:
            print(f"[{cache}] scan / baseline scan: wall {scan.wall_s / base.wall_s:.2f}, CPU {scan.cpu_s / base.cpu_s:.2f}, peak RSS {scan.peak_rss_mb / base.peak_rss_mb:.2f}")
        for dtype in ("fp32", "bf16"):
            ref = by.get((f"transformers {dtype}", cache))
            if ref is None or ref.status != 0:
                continue
            layers = json.loads(ref.output)["layers"]
            seen = [(layer, layers[layer]["out_channel"]) for layer, _, _ in spec["planted"]]
            print(f"[{cache}] transformers {dtype} hooks: down_proj output maxima at planted layers in channels {seen}")
            print(f"[{cache}] vs transformers {dtype}: RSS ratio {scan.peak_rss_mb / ref.peak_rss_mb:.3f} (target < 0.15), "
                  f"time ratio {scan.wall_s / ref.wall_s:.2f} (target <= 0.5), CPU time ratio {scan.cpu_s / ref.cpu_s:.2f}")
        twin = [r for r in twin_runs if r.cache == cache]
        if twin:
            print(f"[{cache}] peak RSS {twin[0].tool.split()[-2]} layers {twin[0].peak_rss_mb:.0f} MB vs "
                  f"{spec['num_hidden_layers']} layers {scan.peak_rss_mb:.0f} MB (ratio {scan.peak_rss_mb / twin[0].peak_rss_mb:.2f})")


if __name__ == "__main__":
    main()
