"""Training batches of the linear probes: sample order, augmentation, frozen forward or cached features.

A batch source maps a :class:`SampleOrder` and a batch size to ``(features, labels)`` batches,
either sliced from features extracted once (``cached_batches``) or from freshly augmented images
passed through the frozen encoder (``augmented_batches``), so the probes train the same way on
both. The augmentations are MAE's (its own RandomResizedCrop) and DINOv2's (torchvision's),
bicubic, with a horizontal flip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from mimkit.data.transforms import Normalization, ToChannels
from mimkit.eval.features import encode
from mimkit.eval.settings import ExtractSettings
from mimkit.models import Backbone


class MaeRandomResizedCrop(v2.RandomResizedCrop):
    """MAE's RandomResizedCrop (``util/crop.py``): one draw of area and log-aspect, no retry loop.

    The crop is ``round(sqrt(area * ratio))`` wide and ``round(sqrt(area / ratio))`` high, each
    clipped to the image, at a uniform position; torchvision instead retries 10 times and falls
    back to a centre crop.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        area = height * width * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
        log_ratio = torch.log(torch.tensor(self.ratio))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item())).item()
        w = min(int(round(math.sqrt(area * aspect))), width)
        h = min(int(round(math.sqrt(area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return dict(top=top, left=left, height=h, width=w)


def probe_train_transform(preset: str, img_size: int, norm: Normalization | None = None) -> v2.Compose:
    """The augmentation of ``preset``'s training images: MAE's or torchvision's RRC (bicubic) + flip.

    ``norm`` is the encoder's input normalisation (ImageNet's RGB statistics by default).
    """
    crop_cls = MaeRandomResizedCrop if preset == "mae" else v2.RandomResizedCrop
    norm = norm or Normalization()
    return v2.Compose(
        [
            ToChannels(norm.channels),
            crop_cls(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            *norm.transforms(),
        ]
    )


class SampleOrder:
    """The order training samples are drawn in, generated one pass at a time (no full list in memory).

    Each of ``passes`` passes is a fresh permutation of the ``num`` samples (seeded once), cut to
    ``per_pass`` samples (MAE's drop_last); ``total`` cuts the whole stream (DINOv2's infinite
    sampler stops after ``iterations x batch``). ``index`` maps positions to dataset indices
    (the grid draws from the samples left after carving the selection split). Iterating gives
    dataset indices, so an instance is a DataLoader sampler.
    """

    def __init__(
        self,
        num: int,
        per_pass: int,
        passes: int,
        seed: int,
        total: int | None = None,
        index: torch.Tensor | None = None,
    ):
        self.num, self.per_pass, self.passes, self.seed = num, per_pass, passes, seed
        self.total = per_pass * passes if total is None else total
        self.index = index

    def __len__(self) -> int:
        return self.total

    def _passes(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        left = self.total
        for _ in range(self.passes):
            if left <= 0:
                return
            perm = torch.randperm(self.num, generator=g)[: min(self.per_pass, left)]
            left -= len(perm)
            yield perm if self.index is None else self.index[perm]

    def __iter__(self) -> Iterator[int]:
        for perm in self._passes():
            yield from perm.tolist()

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Consecutive index tensors of ``batch_size`` (the last may be short), across passes."""
        carry = torch.empty(0, dtype=torch.long)
        for perm in self._passes():
            perm = torch.cat([carry, perm])
            full = len(perm) // batch_size * batch_size
            if full:
                yield from perm[:full].split(batch_size)
            carry = perm[full:]
        if len(carry):
            yield carry


# A batch source maps (sample order, batch size) to an iterator of (features, labels) batches.
Batches = Callable[[SampleOrder, int], Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]]
FEATURES = ("cls", "patch_mean", "last_cls")


def cached_batches(
    features: dict[str, torch.Tensor], device: str | torch.device = "cpu", keys: tuple[str, ...] = FEATURES
) -> Batches:
    """Batches of ``keys`` drawn from features computed once."""
    device = torch.device(device)

    def batches(order: SampleOrder, batch_size: int):
        for idx in order.batches(batch_size):
            yield {k: features[k][idx].to(device) for k in keys}, features["label"][idx].to(device)

    return batches


def augmented_batches(
    dataset: Any,
    encoder: Backbone,
    extract: ExtractSettings | None = None,
    *,
    seed: int = 0,
    tokens: bool = False,
) -> Batches:
    """Batches of freshly augmented images through the frozen encoder, one forward pass each.

    ``extract`` gives the blocks, precision, device and workers; the batch size is the probe's
    (the second argument of the returned batch source), and ``seed`` seeds the workers' augmentations.
    ``tokens`` adds the patch-token maps (``patch_tokens``) to every batch.
    """
    extract = extract or ExtractSettings()
    device = torch.device(extract.device)

    def batches(order: SampleOrder, batch_size: int):
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=order,
            num_workers=extract.workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # base seed of the workers' augmentations
        )
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            feats = encode(encoder, images, extract.n_last_blocks, extract.precision, tokens)
            yield feats, batch["label"].to(device)

    return batches
