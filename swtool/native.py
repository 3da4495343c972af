"""swtool's fused C kernels (kernels/*.c, one library), compiled on first use where a C compiler exists.

Why: the torch codecs make one pass over memory per elementwise op; the C loops
read each block once, and the scan's small products read 16-bit weights in place
(see kernels/core.c). Compiling costs well under a second and is
cached per user, keyed by the source, the compiler and its flags, so it is paid
once per machine. Nothing here is required: without a compiler (or when
compiling, loading or the self-check fails, or SWTOOL_NATIVE=0) `kernels()`
returns None and callers take their torch path (the codecs write the same bytes).

Flags: -O3 with -ffp-contract=off (the compiler fuses no multiply-add: every
rounding of the codecs is the reference's; only linear_half asks for FMA
explicitly; -fno-math-errno and -fno-trapping-math change no result, they only
let loops vectorise), plus -mavx2 / -mfma / -mf16c / -mavx512f only when the CPU
reports them (not -march=native, which can pick instructions a virtual machine
does not run).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from swtool.cache import cache_root

KERNELS = Path(__file__).with_name("kernels")


def sources() -> list[Path]:
    """Every C source of the library, in a fixed order (one file per family of kernels)."""
    return sorted(KERNELS.glob("*.c"))


def cache_inputs() -> list[Path]:
    """Every file whose text decides the compiled library: the sources and the headers they share."""
    return sorted(KERNELS.glob("*.[ch]"))

DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
"""Source dtype codes the kernels take (torch dtype names without the prefix)."""

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
SIGNATURES = {
    "ggml_q8_0": [_P, _I, _L, _P],
    "ggml_q4_0": [_P, _I, _L, _P],
    "ggml_q5_0": [_P, _I, _L, _P],
    "ggml_q4_1": [_P, _I, _L, _P, _P, _P],
    "ggml_q5_1": [_P, _I, _L, _P, _P, _P],
    "ggml_f16": [_P, _I, _L, _P],
    "ggml_bf16": [_P, _I, _L, _P],
    "rtn_quantize": [_P, _I, _L, _L, _I, _I, _P, _P, _P, _P],
    "pack_codes": [_P, _L, _I, _P],
    "linear_half": [_P, _L, _L, _P, _I, _L, _P, _L],
    "linear_half_vectorised": [],
    "kq_encode": [_I, _P, _L, _L, _P, _P],
    "kq_decode": [_I, _P, _L, _P],
}

status = "not loaded yet"
"""Why the kernels are or are not in use, for benchmarks and bug reports."""


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _flags() -> list[str]:
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
    if platform.machine() in ("x86_64", "AMD64"):
        cpu = _cpu_flags()
        flags += [f"-m{f}" for f in ("avx2", "fma", "f16c", "avx512f") if f in cpu]
    return flags


def _cache_dir() -> Path:
    directory = cache_root() / "native"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    # a shared temporary directory: only one this user created and nobody else can write to,
    # since a library found there is loaded into the process
    directory = Path(tempfile.gettempdir()) / f"swtool-native-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.lstat()
    if not directory.is_dir() or directory.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{directory} is not a private directory of this user; not loading code from it")
    return directory


def _build() -> Path:
    """The compiled library's path, compiling it when this source/compiler/flags has not been built yet."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc, gcc or $CC) found")
    flags = _flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([*(path.read_text() for path in cache_inputs()), compiler, version, *flags, platform.machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if not target.is_file():
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            result = subprocess.run([compiler, *flags, "-o", str(temp), *map(str, sources())], capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(temp, target)  # atomic: a concurrent process sees the old state or the whole library
        finally:
            temp.unlink(missing_ok=True)
    return target


def _self_check(lib: ctypes.CDLL) -> None:
    """Refuse a library whose bytes differ from gguf-py's on a small input (a miscompile, a wrong flag)."""
    import gguf
    import numpy as np

    data = np.random.default_rng(7).standard_normal((8, 64), dtype=np.float32)
    data[0, :32] = 0.0
    for name, qtype in (("ggml_q8_0", gguf.GGMLQuantizationType.Q8_0), ("ggml_q4_0", gguf.GGMLQuantizationType.Q4_0)):
        expected = gguf.quants.quantize(data, qtype)
        out = np.empty_like(expected)
        if getattr(lib, name)(data.ctypes.data, 0, data.size // 32, out.ctypes.data) != 0:
            raise OSError(f"{name} self-check reported non-finite values")
        if out.tobytes() != expected.tobytes():
            raise OSError(f"{name} self-check: bytes differ from gguf-py")


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None (see `status`) when they cannot be used here."""
    global status
    if os.environ.get("SWTOOL_NATIVE", "1") == "0":
        status = "disabled by SWTOOL_NATIVE=0"
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
        for name, argtypes in SIGNATURES.items():
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = None if name == "pack_codes" else ctypes.c_int
        _self_check(lib)
    except Exception as exc:  # an optional speed-up: whatever fails here, the torch path still works
        status = f"torch fallback: {exc.__class__.__name__}: {exc}"
        return None
    status = f"native kernels {path.name} ({' '.join(_flags())})"
    return lib


def dtype_code(dtype) -> int | None:
    """The kernels' code for a torch or numpy float dtype, or None when they do not read it."""
    return DTYPES.get(str(dtype).removeprefix("torch."))


def product_kernels() -> ctypes.CDLL | None:
    """The kernels where `linear_half` is vectorised, or None: a scalar build multiplies more
    slowly than converting the weights for torch (callers then keep torch's path)."""
    lib = kernels()
    return lib if lib is not None and lib.linear_half_vectorised() else None
