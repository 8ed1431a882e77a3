"""Frozen encoders and the features every evaluation protocol reads.

Three features per image, all taken after the encoder's final LayerNorm (DINO's and DINOv2's
``get_intermediate_layers(n, norm=True)`` convention; MAE's linear probe reads the first):

- ``cls``: the final-normed cls token of the last block, (N, D);
- ``patch_mean``: the mean of the last block's final-normed patch tokens (cls excluded), (N, D);
- ``last_cls``: the cls tokens of the last n blocks, each through the final norm, oldest block
  first, (N, n, D); ``last_cls[:, -1]`` is ``cls``.

Encoders come from :func:`load_encoder` (an export, a run directory, or a registry name with a
checkpoint; ``random_init`` gives an untrained encoder of the same shape). Features of a whole
labelled source come from :func:`source_features`, optionally through an on-disk cache keyed by
the encoder's weights, the source, the split and the transform. How the forward passes run
(input size, blocks, precision, batch, device, workers, cache, progress) is one
:class:`~mimkit.eval.settings.ExtractSettings`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mimkit.data import build_source, build_transform
from mimkit.data.transforms import Normalization
from mimkit.eval.settings import PRECISIONS, ExtractSettings
from mimkit.files import atomic_write
from mimkit.interop.loading import read_state_dict
from mimkit.interop.timm import resample_encoder_state
from mimkit.models import Backbone, create_backbone, list_backbones, load_backbone
from mimkit.models.backbone import ENCODER_CONFIG, ENCODER_WEIGHTS, OVERRIDABLE

FEATURE_KEYS = ("cls", "patch_mean", "last_cls", "label")


# ----------------------------------------------------------------------------- encoders


def _find_export(path: Path) -> Path:
    """The ``encoder.safetensors`` that ``path`` names (a file, an export or a run directory)."""
    if path.is_dir():
        weights = path / ENCODER_WEIGHTS
        if weights.is_file() or (path / ENCODER_CONFIG).is_file():
            return weights
        if (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir():
            raise FileNotFoundError(
                f"run directory {path} holds no exported encoder yet ({ENCODER_WEIGHTS} + {ENCODER_CONFIG} "
                "are written when pretraining ends)"
            )
        raise FileNotFoundError(
            f"directory {path} holds no {ENCODER_WEIGHTS}; expected an encoder export or a "
            "pretraining run directory"
        )
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".safetensors")
    raise ValueError(f"encoder file {path} is neither {ENCODER_WEIGHTS} nor {ENCODER_CONFIG}")


def _arch(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in OVERRIDABLE if k in config and config[k] is not None}


def _resized_state(state: dict[str, torch.Tensor], model: Backbone) -> dict[str, torch.Tensor]:
    """Fit a state dict to ``model``'s patch grid: a sin-cos table is regenerated, a learned one resampled."""
    if state["pos_embed"].shape == model.pos_embed.shape:
        return state
    return resample_encoder_state(state, tuple(model.patch_embed.img_size))


def _random_backbone(name: str, arch: dict[str, Any], seed: int) -> Backbone:
    """An untrained backbone, seeded without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_backbone(name, **arch)


def load_encoder(
    spec: str | os.PathLike,
    *,
    random_init: bool = False,
    img_size: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    normalization: Normalization | None = None,
) -> Backbone:
    """A frozen encoder in eval mode on ``device``.

    Args:
        spec: an export directory or pretraining run directory (holding ``encoder.safetensors`` and
            ``encoder.json``), either of those two files, or a registered backbone name (which
            needs ``checkpoint`` or ``random_init``).
        random_init: build an untrained encoder of the same shape (timm's initialisation, seeded by
            ``seed``), the floor every result is read against; only the JSON config is read.
        img_size: evaluate at this resolution (default: the encoder's own). A sin-cos position
            table is regenerated for the new grid; a learned one is resampled bicubically.
        checkpoint: a timm-keyed state dict (``.safetensors`` or a torch file, optionally under
            ``"model"``) for a registry-name ``spec``.
        seed: the seed of ``random_init``.
        normalization: replaces the input normalisation recorded in the export (which evaluation
            transforms read through :func:`input_normalization`); the override is printed.

    The returned module carries ``origin``, a dict describing where it came from.
    """
    path = Path(spec)
    if path.exists():
        weights = _find_export(path)
        config_path = weights.with_suffix(".json")
        if not config_path.is_file():
            raise FileNotFoundError(f"encoder config {config_path} not found next to {weights}")
        config = json.loads(config_path.read_text())
        if random_init:
            model = _random_backbone(config["name"], _arch(config), seed)
            model.normalization = config.get("normalization")  # read as the pretrained one is
        else:
            model = load_backbone(weights)
    elif str(spec) in list_backbones():
        if random_init:
            model = _random_backbone(str(spec), {}, seed)
        elif checkpoint is None:
            raise ValueError(f"backbone name {spec!r} needs a checkpoint or random_init=True (--random-init)")
        else:
            model = create_backbone(str(spec))
            model.load_state_dict(_resized_state(read_state_dict(checkpoint), model), strict=True)
    else:
        raise FileNotFoundError(
            f"encoder {str(spec)!r} not found: expected an export directory, {ENCODER_WEIGHTS}, a "
            f"pretraining run directory, or a backbone name ({', '.join(list_backbones())}) with a "
            "checkpoint or --random-init"
        )
    if img_size is not None and [img_size, img_size] != list(model.patch_embed.img_size):
        resized = create_backbone(model.name, **{**_arch(model.config), "img_size": img_size})
        resized.load_state_dict(_resized_state(model.state_dict(), resized), strict=True)
        resized.normalization = model.normalization
        model = resized
    if normalization is not None:
        if normalization.channels != model.in_chans:
            raise ValueError(
                f"the normalisation override has {normalization.channels} channel(s) but the encoder reads "
                f"{model.in_chans}; give one mean and one std per input channel"
            )
        recorded = input_normalization(model).to_dict()
        print(f"[mimkit] input normalisation {normalization.to_dict()} replaces the encoder's {recorded}")
        model.normalization = normalization.to_dict()
    model.origin = {
        "spec": str(spec),
        "path": str(path.resolve()) if path.exists() else None,
        "random_init": random_init,
        "seed": seed if random_init else None,
    }
    return model.to(device).eval().requires_grad_(False)


def input_normalization(encoder: Backbone) -> Normalization:
    """The normalisation ``encoder`` was trained with (its export's), ImageNet's where none is recorded."""
    return Normalization.from_dict(getattr(encoder, "normalization", None), encoder.in_chans)


def encoder_digest(encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's state dict (names, shapes, dtypes and values), hex."""
    h = hashlib.sha256()
    for key, value in sorted(encoder.state_dict().items()):
        value = value.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def describe_encoder(encoder: Backbone) -> dict[str, Any]:
    """Where an encoder came from and what it is, for result files."""
    return {
        **getattr(encoder, "origin", {"spec": None, "random_init": False}),
        "sha256": encoder_digest(encoder)[:16],
        "config": dict(encoder.config),
        "img_size": list(encoder.patch_embed.img_size),
        "normalization": input_normalization(encoder).to_dict(),
    }


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def encode(
    encoder: Backbone, images: torch.Tensor, n_last_blocks: int = 1, precision: str = "fp32"
) -> dict[str, torch.Tensor]:
    """Float32 features of one batch of images (B, C, H, W); see the module docstring for the keys."""
    depth = len(encoder.blocks)
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks={n_last_blocks} must be between 1 and the encoder's depth {depth}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outs = encoder.forward_intermediates(
            images,
            indices=n_last_blocks,
            norm=True,
            return_prefix_tokens=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
    last_cls = torch.stack([prefix[:, 0] for _, prefix in outs], dim=1).float()
    return {"cls": last_cls[:, -1], "patch_mean": outs[-1][0].float().mean(dim=1), "last_cls": last_cls}


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


@torch.no_grad()
def extract_features(
    encoder: Backbone | Mapping[str, Backbone],
    dataset: Dataset,
    extract: ExtractSettings | None = None,
    *,
    desc: str = "features",
) -> dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]]:
    """Features of every sample of ``dataset`` (float32 on the CPU), plus ``label`` where it has one.

    ``encoder`` may be a mapping of names to encoders: they then share one pass over the data
    (images decoded and transformed once) and the result maps the same names to features.
    ``extract`` gives the blocks, precision, batch, device, workers and progress bar; the
    dataset's own transform decides the input (``img_size`` and ``cache_dir`` are not read).
    """
    extract = extract or ExtractSettings()
    device = torch.device(extract.device)
    encoders = dict(encoder) if isinstance(encoder, Mapping) else {"": encoder}
    for model in encoders.values():
        model.to(device).eval()
    parts: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in encoders}
    labels: list[torch.Tensor] = []
    loader = _loader(dataset, extract.batch_size, extract.workers, device)
    for batch in tqdm(loader, desc=desc, disable=not extract.progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        for name, model in encoders.items():
            for key, value in encode(model, images, extract.n_last_blocks, extract.precision).items():
                parts[name].setdefault(key, []).append(value.cpu())
        if "label" in batch:
            labels.append(batch["label"].long())
    out = {}
    for name, feats in parts.items():
        out[name] = {key: torch.cat(values) for key, values in feats.items()}
        if labels:
            out[name]["label"] = torch.cat(labels)
    return out if isinstance(encoder, Mapping) else out[""]


def require_labels(dataset: Dataset, uri: str, split: str) -> None:
    """Raise a ValueError naming ``uri`` when its samples carry no ``label``."""
    if len(dataset) == 0:
        raise ValueError(f"source {uri!r} has no samples in its {split} split")
    if "label" not in dataset[0]:
        reason = getattr(dataset, "unlabelled_reason", None)
        raise ValueError(
            f"source {uri!r} ({split} split) yields no labels{f' ({reason})' if reason else ''}; "
            "classification protocols need a labelled source such as synthetic:shapes or folder:PATH "
            "with class folders, PATH/<class>/<image>"
        )


def require_labelled_source(uri: str, split: str) -> None:
    """:func:`require_labels` on ``uri``'s ``split``: to fail before another source's features are made."""
    require_labels(build_source(uri, split, None), uri, split)


def num_classes_of(dataset: Dataset, *labels: torch.Tensor) -> int:
    """The number of classes: the source's ``class_names`` where it has them, else the largest label + 1."""
    names = getattr(dataset, "class_names", None)
    largest = max(int(t.max()) for t in labels if t.numel()) + 1 if labels else 0
    return max(len(names), largest) if names is not None else largest


def cache_key(
    encoder: Backbone, uri: str, split: str, transform: Any, n_last_blocks: int, precision: str = "fp32"
) -> str:
    """Hex key of a feature file: encoder weights, source URI, split, transform, blocks, precision."""
    h = hashlib.sha256()
    for part in (encoder_digest(encoder), uri, split, repr(transform), str(n_last_blocks), precision):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def source_features(
    encoder: Backbone, uri: str, split: str, extract: ExtractSettings | None = None
) -> dict[str, torch.Tensor]:
    """Features of a labelled source's ``split`` under the evaluation transform (centre crop).

    ``extract`` says how (default :class:`~mimkit.eval.settings.ExtractSettings`: the encoder's
    size, the last block, fp32, 256 images per pass on the CPU). With ``extract.cache_dir``,
    features are read from / written to ``cache_dir/<key>.safetensors`` (see :func:`cache_key`;
    written to a temporary name and renamed). Note that the key names the source by its URI, so a
    folder whose images change under the same path needs a fresh cache.
    """
    extract = extract or ExtractSettings()
    transform = build_transform("eval", extract.image_size(encoder), input_normalization(encoder))
    dataset = build_source(uri, split, transform)
    require_labels(dataset, uri, split)
    path = None
    if extract.cache_dir is not None:
        key = cache_key(encoder, uri, split, transform, extract.n_last_blocks, extract.precision)
        path = Path(extract.cache_dir) / f"{key}.safetensors"
        if path.is_file():
            return load_file(str(path))
    feats = extract_features(encoder, dataset, extract, desc=f"features {split}")
    feats["num_classes"] = torch.tensor(num_classes_of(dataset, feats["label"]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in feats.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return feats
