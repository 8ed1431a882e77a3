"""The ``eval`` section: a method's own evaluation on a held-out split, and the best checkpoint it picks.

A method that evaluates (fine-tuning) has ``evaluate(batch) -> {metric: sum over the batch,
"count": images}`` and a class attribute ``eval_metrics = {metric: "max" | "min"}``. The trainer
runs it over ``eval.split`` of ``eval.source`` (``data.source`` unless set) under the evaluation
transform (resize, centre crop, normalise: no randomness), every rank on its own stride of the
split, sums over ranks and logs the per-image means as ``<split>_<metric>``. It draws from no
global random stream, so evaluating does not change what training does next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from mimkit.train.config import Recipe
from mimkit.train.distributed import Dist


class Evaluator:
    """``evaluator(module, device, dtype) -> {metric: mean}`` over one split, on every rank of the job."""

    def __init__(self, recipe: Recipe, dist: Dist):
        from mimkit.data import build_source, build_transform

        d, e = recipe.data, recipe.eval
        self.split = e.split
        source = e.source or d.source
        transform = build_transform("eval", recipe.img_size, recipe.normalization)
        dataset = build_source(source, e.split, transform)
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"eval.source {source!r} is a stream; evaluation reads an indexed source (synthetic:, "
                "folder:), e.g. eval.source=folder:/data/imagenet"
            )
        if len(dataset) < dist.world_size:
            raise ValueError(
                f"eval.split {e.split!r} of {source!r} holds {len(dataset)} images, fewer than the "
                f"{dist.world_size} rank(s) that share it"
            )
        self.images = len(dataset)
        self.loader = DataLoader(
            Subset(dataset, range(dist.rank, len(dataset), dist.world_size)),
            batch_size=e.micro_size or recipe.batch.micro_size,
            shuffle=False,
            num_workers=d.workers,
            pin_memory=dist.device.type == "cuda",
            generator=torch.Generator(),  # an iterator draws its base seed here, not from the global stream
        )
        self.world_size = dist.world_size

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        was_training = module.training
        module.eval()
        sums: dict[str, torch.Tensor] = {}
        try:
            for batch in self.loader:
                batch = {
                    k: v.to(device, dtype if v.is_floating_point() else None, non_blocking=True)
                    for k, v in batch.items()
                }
                for key, value in module.evaluate(batch).items():
                    sums[key] = sums.get(key, 0.0) + value.detach().to(torch.float64)
        finally:
            module.train(was_training)
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys]).to(device)
        if self.world_size > 1:
            torch.distributed.all_reduce(totals)
        values = dict(zip(keys, totals.tolist()))
        count = values.pop("count")
        return {key: value / count for key, value in values.items()}


@dataclass
class Best:
    """The best value of ``metric`` so far and the step it was reached at (saved with every checkpoint)."""

    metric: str
    mode: str  # "max" or "min"
    value: float | None = None
    step: int | None = None

    def update(self, scores: dict[str, float], step: int) -> bool:
        """Take ``scores`` at ``step`` if they beat the best (ties keep the earlier); True if they did."""
        value = scores[self.metric]
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value, self.step = value, step
        return better

    def state(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step}

    @classmethod
    def from_state(cls, metric: str, mode: str, state: dict[str, Any] | None) -> Best:
        """A fresh tracker, or the saved one if it tracked the same metric."""
        if state and state.get("metric") == metric and state.get("mode") == mode:
            return cls(metric, mode, state.get("value"), state.get("step"))
        return cls(metric, mode)
