"""Edits of single weights, the paper's ablations: zero or scale the super weights, prune other outliers.

`edit_tensor` is the one definition of what an edit does to a tensor: `swtool
edit` streams it over a checkpoint into a new one, and `swtool eval` applies it
to each layer in memory, so an ablation can be measured without writing it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from swtool.errors import SwtoolError
from swtool.formats.base import Held


@dataclass(frozen=True)
class EditPlan:
    supers: tuple[Held, ...] = ()
    zero_super: bool = False
    scale_super: float | None = None
    zero_outliers: int = 0
    """Prune this many largest-magnitude weights of each linear tensor, super weights excepted."""

    def __post_init__(self) -> None:
        if self.zero_super and self.scale_super is not None:
            raise SwtoolError("--zero-super and --scale-super exclude each other (zeroing is --scale-super 0)")
        if self.zero_outliers < 0:
            raise SwtoolError("--zero-outliers must be a non-negative count")

    @property
    def factor(self) -> float | None:
        """What the super weights are multiplied by, or None when they are left alone."""
        return 0.0 if self.zero_super else self.scale_super

    @property
    def active(self) -> bool:
        return self.factor is not None or self.zero_outliers > 0

    def touches(self, name: str, linear: Collection[str]) -> bool:
        return (self.factor is not None and any(s.tensor == name for s in self.supers)) or (self.zero_outliers > 0 and name in linear)

    def describe(self) -> dict:
        return {
            "zero_super": self.zero_super,
            "scale_super": self.scale_super,
            "zero_outliers": self.zero_outliers,
            "super_weights": [[s.tensor, s.row, s.col] for s in self.supers],
        }


def edit_tensor(plan: EditPlan, name: str, weight: torch.Tensor, is_linear: bool) -> torch.Tensor:
    """The tensor with the plan applied (a new tensor; the input is left untouched)."""
    out = weight.clone()
    mine = [(s.row, s.col) for s in plan.supers if s.tensor == name]
    if plan.zero_outliers and is_linear:
        magnitude = out.abs().flatten()
        for row, col in mine:  # the super weights are never counted as outliers
            magnitude[row * out.shape[1] + col] = -1
        count = min(plan.zero_outliers, magnitude.numel() - len(mine))
        out.view(-1)[torch.topk(magnitude, count, sorted=False).indices] = 0
    if plan.factor is not None:
        for row, col in mine:
            out[row, col] = weight[row, col] * plan.factor
    return out
