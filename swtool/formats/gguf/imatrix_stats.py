"""The `.stats` tensor llama-imatrix stores with every weight, computed from the sums as llama.cpp does.

llama-imatrix (`compute_vector_statistics`, `compute_tensor_statistics`) summarises each weight
into 12 numbers (STATS_SCHEMA) that `--show-statistics` and newer llama-quantize read; writing
them keeps swtool's file a drop-in replacement. Per weight, over every matrix that saw a token:

- sum_sq: sum over columns of E[x_j^2] (in_sum2 / count); elements: the number of such columns;
- mean, std_deviation, skewness, kurtosis: moments of the columns' mean activation E[x_j];
- h_norm: entropy (bits) of the E[x_j^2] distribution, as a percentage of log2(elements);
- gain, l2_dist, cossim, pearson, covariance: against the same weight in the nearest earlier layer
  (gain: ratio of RMS; the rest compare the E[x_j] vectors); NaN where there is none (layer 0).

Accumulations are in float64 as llama.cpp's, from the float32 sums as stored, so values agree
with llama-imatrix's to float32 rounding (not bit for bit: the order of summation differs).
"""

from __future__ import annotations

import math
import re

import numpy as np

from swtool.formats.gguf.imatrix import STATS_SCHEMA, Entry

LAYER = re.compile(r"(?:^|\.)blk\.(\d+)\.")
NAN = float("nan")
TINY = float(np.float32(1e-10))
"""llama.cpp compares against 1e-10f, a float."""


def _vector(entry: Entry) -> dict[str, float] | None:
    """compute_vector_statistics: None where no column of any matrix saw a finite value."""
    counts = np.asarray(entry.counts, np.float64).reshape(-1)
    seen = counts > 0
    if not seen.any() or entry.in_sum is None:
        return None
    scale = 1.0 / counts[seen][:, None]
    squares = (entry.in_sum2[seen].astype(np.float64) * scale).reshape(-1)
    means = (entry.in_sum[seen].astype(np.float64) * scale).reshape(-1)
    keep = np.isfinite(squares) & np.isfinite(means)
    squares, means = squares[keep], means[keep]
    n = int(keep.sum())
    if n == 0:
        return None
    mean = float(np.mean(means))
    diff = means - mean
    m2, m3, m4 = (float(np.sum(diff**k)) for k in (2, 3, 4))
    energy = float(np.sum(squares[squares > 0]))
    entropy = 0.0
    if energy > 0:
        p = np.maximum(squares, 0) / energy
        p = p[p > 1e-10]
        entropy = float(-np.sum(p * np.log(p) / math.log(2.0)))
    variance = m2 / n if n > 1 else 0.0
    std = float(np.sqrt(np.float32(max(variance, 0.0))))
    skewness = kurtosis = 0.0
    if std > TINY:
        var = m2 / n
        skewness = m3 / n / (var * math.sqrt(var))
        kurtosis = m4 / n / (var * var) - 3.0
    h_norm = float(np.float32(100.0) * (np.float32(entropy) / np.log2(np.float32(n)))) if n > 1 else NAN
    return {"sum_sq": float(np.sum(squares)), "mean": mean, "elements": float(n), "std_deviation": std, "skewness": skewness,
            "kurtosis": kurtosis, "gain": NAN, "h_norm": h_norm, "l2_dist": NAN, "cossim": NAN, "pearson": NAN, "covariance": NAN}


def _averages(entry: Entry) -> np.ndarray:
    """compute_tensor_averages with activations: E[x_j] per matrix as float32, NaN for matrices without tokens."""
    counts = np.asarray(entry.counts, np.float32).reshape(-1, 1)
    scale = np.where(counts > 0, np.float32(1) / np.where(counts > 0, counts, 1), np.float32(np.nan)).astype(np.float32)
    return (entry.in_sum.astype(np.float32) * scale).reshape(-1)


def _compare(stats: dict[str, float], previous: dict[str, float], current: Entry, before: Entry) -> None:
    """compute_tensor_statistics for one weight against its predecessor, in place."""
    c, p = _averages(current).astype(np.float64), _averages(before).astype(np.float64)
    if c.size != p.size:
        return
    keep = np.isfinite(c) & np.isfinite(p)
    n = int(keep.sum())
    if n == 0:
        return
    c, p = c[keep], p[keep]
    dc, dp = c - c.mean(), p - p.mean()
    dot, norm1, norm2 = float(c @ p), float(c @ c), float(p @ p)
    cov, var_c, var_p = float(dc @ dp), float(dc @ dc), float(dp @ dp)
    stats["l2_dist"] = math.sqrt(float(np.sum((c - p) ** 2)))
    if n > 1:
        stats["covariance"] = cov / n
    if norm1 > 0 and norm2 > 0:
        stats["cossim"] = min(1.0, max(-1.0, dot / (math.sqrt(norm1) * math.sqrt(norm2))))
    else:
        stats["cossim"] = NAN if norm1 == 0 and norm2 == 0 else 0.0
    if var_c > 0 and var_p > 0:
        stats["pearson"] = min(1.0, max(-1.0, cov / (math.sqrt(var_c) * math.sqrt(var_p))))
    else:
        stats["pearson"] = NAN if var_c == 0 and var_p == 0 else 0.0
    if previous["sum_sq"] > TINY:
        stats["gain"] = math.sqrt(stats["sum_sq"] / stats["elements"]) / math.sqrt(previous["sum_sq"] / previous["elements"])
    else:
        stats["gain"] = 1.0 if stats["sum_sq"] <= TINY else NAN


def imatrix_stats(entries: dict[str, Entry]) -> dict[str, np.ndarray]:
    """Weight name -> its (12,) float32 `.stats` vector; zeros where llama-imatrix has no statistics for it."""
    found = {name: s for name, entry in entries.items() if (s := _vector(entry)) is not None}
    for name, stats in found.items():
        layer = LAYER.search(name)
        if layer is None or int(layer.group(1)) <= 0:
            continue
        block = int(layer.group(1))
        start = layer.start() + (1 if layer.group(0).startswith(".") else 0)
        for prev in range(block - 1, -1, -1):
            earlier = name[:start] + f"blk.{prev}." + name[layer.end() :]
            if earlier in found:
                _compare(stats, found[earlier], entries[name], entries[earlier])
                break
    out = {}
    for name in entries:
        stats = found.get(name)
        out[name] = np.array([stats[k] for k in STATS_SCHEMA] if stats else [0.0] * len(STATS_SCHEMA), dtype=np.float32)
    return out
