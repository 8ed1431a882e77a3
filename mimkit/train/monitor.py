"""Watching the encoder while it trains: an online k-NN monitor and reconstruction pictures.

A masked-image-modelling loss says little about the encoder (a norm-pix MAE loss moves a few per
cent while k-NN accuracy doubles), so ``run.monitor`` measures what the evaluation tools measure,
on a small labelled split, every ``every`` steps::

    run:
      monitor: {every: 1000, source: null, images: 2000, queries: 500, k: 20}

The bank is ``images`` images of the source's train split (a seeded draw, so a class-ordered folder
gives every class), the queries ``queries`` images of its val split, both under the evaluation
tools' transform (resize, centre crop, the run's normalisation). Features are the final-normed
cls token and the mean patch token of the current encoder in eval mode without gradients; the
score is DINO's weighted k-NN top-1 (T = 0.07), logged as ``monitor_knn_cls`` and
``monitor_knn_patch_mean`` with the seconds it took (``monitor_seconds``). It runs before the
first step (the random init's value), every ``every`` steps and at the last step.

``run.images_every`` draws the same fixed val images' reconstructions (``mimkit visualize recon``'s
picture) into ``RUN/images/stepNNNNNNNN.png`` and the image loggers.

Neither changes what training does next: the random states (torch, CUDA, numpy, Python) are put
back afterwards, and their loaders draw from no global stream, so a run with them is the run
without them. Every rank computes the same values (under ZeRO-3 every rank must take part in a
forward pass); rank 0 logs them.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mimkit.train.config import Recipe, RecipeError
from mimkit.train.loggers import IMAGES_DIR

MONITOR_DEFAULTS: dict[str, Any] = {"every": 1000, "source": None, "images": 2000, "queries": 500, "k": 20}
MONITOR_SEED = 0  # which images form the bank and the queries
RECON_IMAGES = 8


@contextlib.contextmanager
def preserved_random_state(device: torch.device) -> Iterator[None]:
    """Put every random stream back as it was on entry, whatever the block draws."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _seeded_subset(dataset: Dataset, count: int) -> Dataset:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(MONITOR_SEED))
    return Subset(dataset, sorted(order[:count].tolist()))


class KnnMonitor:
    """``monitor(encoder, device, dtype) -> {"monitor_knn_cls": ..., ...}`` on ``run.monitor``'s split.

    Built at the start of a run: a source without labels, without a val split or smaller than
    ``images`` is a :class:`RecipeError` there, before any training.
    """

    def __init__(self, recipe: Recipe):
        from mimkit.data import build_transform
        from mimkit.eval.features import classification_source, require_labels

        m = recipe.run.monitor
        self.every, self.k = m["every"], m["k"]
        uri = m["source"] or recipe.data.source
        transform = build_transform("eval", recipe.img_size, recipe.normalization)
        parts = {}
        for split, count, key in (("train", m["images"], "images"), ("val", m["queries"], "queries")):
            try:
                dataset = classification_source(uri, split, transform)
                require_labels(dataset, uri, split)
            except (ValueError, OSError) as err:
                raise RecipeError(
                    f"run.monitor: {err}; set run.monitor.source to a labelled source"
                ) from None
            if len(dataset) < count:
                raise RecipeError(
                    f"run.monitor.{key}={count}: the {split} split of {uri!r} holds {len(dataset)} images"
                )
            parts[split] = _seeded_subset(dataset, count)
        batch = recipe.eval.micro_size or recipe.batch.micro_size
        self.loaders = {
            split: DataLoader(
                part, batch_size=batch, shuffle=False, num_workers=0, generator=torch.Generator()
            )
            for split, part in parts.items()
        }
        self.seconds = 0.0
        self.runs = 0

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    @torch.no_grad()
    def _features(self, encoder: nn.Module, split: str, device: torch.device, dtype: torch.dtype):
        from mimkit.eval.features import encode

        feats: dict[str, list[torch.Tensor]] = {"cls": [], "patch_mean": [], "label": []}
        for batch in self.loaders[split]:
            out = encode(encoder, batch["image"].to(device, dtype, non_blocking=True))
            feats["cls"].append(out["cls"].cpu())
            feats["patch_mean"].append(out["patch_mean"].cpu())
            feats["label"].append(batch["label"].long())
        return {key: torch.cat(values) for key, values in feats.items()}

    def __call__(self, encoder: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
        from mimkit.eval.knn import knn_top1

        start = time.perf_counter()
        was_training = encoder.training
        encoder.eval()
        try:
            with preserved_random_state(device):
                bank = self._features(encoder, "train", device, dtype)
                queries = self._features(encoder, "val", device, dtype)
        finally:
            encoder.train(was_training)
        out = {}
        for kind in ("cls", "patch_mean"):
            scores = knn_top1(bank[kind], bank["label"], queries[kind], queries["label"], ks=(self.k,))
            out[f"monitor_knn_{kind}"] = scores[self.k]
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.runs += 1
        out["monitor_seconds"] = round(seconds, 3)
        return out


class Reconstructions:
    """``run.images_every``: fixed val images' reconstructions as a (C, H, W) grid, saved as a PNG.

    The first call happens before training: a method that predicts no pixels fails there with a
    :class:`RecipeError` naming the key.
    """

    def __init__(self, recipe: Recipe, run_dir: Path):
        from mimkit.visualize import recon_images

        self.every = recipe.run.images_every
        self.directory = run_dir / IMAGES_DIR
        self.method_name = recipe.method.name
        norm = recipe.normalization
        self.images = recon_images(recipe.data.source, recipe.img_size, norm, RECON_IMAGES)
        self.mean, self.std = torch.tensor(norm.mean), torch.tensor(norm.std)
        self.seconds = 0.0

    def due(self, step: int, last_step: int) -> bool:
        return step % self.every == 0 or step == last_step

    def path(self, step: int) -> Path:
        return self.directory / f"step{step:08d}.png"

    @torch.no_grad()
    def __call__(self, method: nn.Module, device: torch.device, dtype: torch.dtype, step: int, write: bool):
        """The grid at ``step`` (written to :meth:`path` where ``write``), or a RecipeError."""
        from mimkit.visualize import grid_picture, reconstruct

        start = time.perf_counter()
        was_training = method.training
        method.eval()
        try:
            with preserved_random_state(device):
                pictures = reconstruct(
                    method, self.images.to(device, dtype), self.mean.to(device), self.std.to(device)
                )
        except (ValueError, KeyError, TypeError) as err:  # a method that paints nothing from images alone
            raise RecipeError(
                f"run.images_every={self.every}: cannot draw reconstructions of method {self.method_name!r} "
                f"({err}); set run.images_every=0"
            ) from None
        finally:
            method.train(was_training)
        grid = grid_picture({k: v.float() for k, v in pictures.items()})
        if write:
            from torchvision.utils import save_image

            from mimkit.files import atomic_write

            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path(step), lambda tmp: save_image(grid, tmp))
        self.seconds += time.perf_counter() - start
        return grid
