"""Data-independent mask generators for masked image modelling.

A generator is built from a recipe entry (``{"type": "random", "ratio": 0.75}``) and called
as ``gen(batch_size, grid_size, generator=g, device=d)``. It returns a boolean tensor
(batch, rows*cols), True = masked, in row-major patch order, with the same number of masked
patches in every sample so the visible tokens stack into one tensor. Randomness comes only
from the ``torch.Generator`` passed in (or torch's default one), so a seed reproduces a mask.

New kinds (e.g. ColorMAE's filtered-noise masks) subclass :class:`MaskGenerator` and register
with :func:`register_mask`; nothing else changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mimkit.registry import Registry


def num_masked(num_patches: int, ratio: float) -> int:
    """Masked count for a ratio; MAE keeps ``int(L * (1 - ratio))`` patches visible."""
    return num_patches - int(num_patches * (1 - ratio))


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio!r}")
    return float(ratio)


class MaskGenerator:
    """Base class: subclasses implement :meth:`sample`."""

    def __init__(self, ratio: float = 0.75):  # MAE's ratio
        self.ratio = check_ratio(ratio)

    def __call__(
        self,
        batch_size: int,
        grid_size: tuple[int, int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """(batch_size, rows*cols) bool mask, True = masked, equal count per sample."""
        rows, cols = grid_size
        mask = self.sample(batch_size, (rows, cols), generator)
        expected = num_masked(rows * cols, self.ratio)
        assert mask.shape == (batch_size, rows * cols) and bool((mask.sum(1) == expected).all())
        return mask.to(device) if device is not None else mask

    def sample(self, batch_size: int, grid_size: tuple[int, int], generator: torch.Generator | None):
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch; a no-op unless the generator follows a schedule."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


MASKS: Registry[MaskGenerator] = Registry("mask type", key="type")


def register_mask(name: str) -> Callable[[type[MaskGenerator]], type[MaskGenerator]]:
    """Class decorator registering a mask generator under ``name``; its options are its constructor's."""
    return MASKS.register(name)


def list_masks() -> list[str]:
    """Registered mask types."""
    return MASKS.names()


def build(cfg: dict[str, Any]) -> MaskGenerator:
    """Build a generator from a recipe entry such as ``{"type": "block", "ratio": 0.5}``."""
    return MASKS.build(cfg)


@register_mask("random")
class RandomMasking(MaskGenerator):
    """MAE's per-sample uniform masking (He et al. 2022): argsort of uniform noise.

    The ``L - int(L * (1 - ratio))`` patches with the largest noise are masked, exactly the
    set the official ``random_masking`` removes.
    """

    def sample(self, batch_size, grid_size, generator):
        length = grid_size[0] * grid_size[1]
        noise = torch.rand(batch_size, length, generator=generator)
        ids_shuffle = noise.argsort(dim=1)
        mask = torch.ones(batch_size, length, dtype=torch.bool)
        keep = length - num_masked(length, self.ratio)
        mask.scatter_(1, ids_shuffle[:, :keep], False)
        return mask


@register_mask("block")
class BlockMasking(MaskGenerator):
    """BEiT's block-wise masking (Bao et al. 2022), as CAE uses it.

    Rectangles with area uniform in ``[min_num_patches, remaining budget]`` and log aspect
    ratio uniform in ``[log(min_aspect), log(max_aspect)]`` (max defaults to 1/min_aspect)
    are placed at random; a rectangle is accepted only if it adds between 1 and the remaining
    budget of new patches, with up to 10 attempts per rectangle.

    BEiT stops when a round adds nothing, which can leave a sample short of its target; here
    the count must be exact, so the remainder is filled by growing existing blocks into
    random 4-neighbouring patches. This keeps every masked region connected to a block.
    """

    def __init__(
        self,
        ratio: float = 0.4,
        min_num_patches: int = 16,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_rounds: int = 1000,
    ):
        super().__init__(ratio)
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_rounds = max_rounds

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        rows, cols = mask.shape
        for _ in range(10):
            # BEiT draws uniform(min_num_patches, budget) even when the budget is the smaller one
            area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < rows and 0 < w < cols:
                top, left = int(rng.integers(rows - h + 1)), int(rng.integers(cols - w + 1))
                window = mask[top : top + h, left : left + w]
                added = h * w - int(window.sum())
                if 0 < added <= budget:
                    window[:] = True
                    return added
        return 0

    def _grow(self, mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
        for _ in range(missing):
            near = np.zeros_like(mask)
            near[1:] |= mask[:-1]
            near[:-1] |= mask[1:]
            near[:, 1:] |= mask[:, :-1]
            near[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(near & ~mask)
            if len(candidates) == 0:  # empty mask: start anywhere
                candidates = np.flatnonzero(~mask)
            mask.flat[candidates[rng.integers(len(candidates))]] = True

    def sample(self, batch_size, grid_size, generator):
        # The loop draws a few scalars per block; numpy's generator does that ~10x faster than
        # torch's 0-d tensors, so the torch generator only seeds it (one draw per batch).
        rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
        target = num_masked(grid_size[0] * grid_size[1], self.ratio)
        masks = np.zeros((batch_size, *grid_size), dtype=bool)
        for mask in masks:
            count = 0
            for _ in range(self.max_rounds):
                if count >= target:
                    break
                count += self._add_block(mask, target - count, rng)
            self._grow(mask, target - count, rng)
        return torch.from_numpy(masks.reshape(batch_size, -1))

    def __repr__(self) -> str:
        return f"BlockMasking(ratio={self.ratio}, min_num_patches={self.min_num_patches})"


def ids_keep(mask: torch.Tensor) -> torch.Tensor:
    """(B, K) indices of the visible patches (ascending) of an equal-count bool mask."""
    return (~mask).nonzero()[:, 1].view(mask.shape[0], -1)


def ids_masked(mask: torch.Tensor) -> torch.Tensor:
    """(B, M) indices of the masked patches (ascending) of an equal-count bool mask."""
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)
