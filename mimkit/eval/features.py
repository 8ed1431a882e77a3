"""Frozen encoders and the features every evaluation protocol reads.

Three features per image, all taken after the encoder's final LayerNorm (DINO's and DINOv2's
``get_intermediate_layers(n, norm=True)`` convention; MAE's linear probe reads the first):

- ``cls``: the final-normed cls token of the last block, (N, D);
- ``patch_mean``: the mean of the last block's final-normed patch tokens (cls excluded), (N, D);
- ``last_cls``: the cls tokens of the last n blocks, each through the final norm, oldest block
  first, (N, n, D); ``last_cls[:, -1]`` is ``cls``;
- ``patch_tokens`` where asked for (``tokens=True``): the last block's final-normed patch tokens,
  (N, P, D), the input of the attentive probe.

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
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from mimkit.data import build_source, build_transform
from mimkit.data.transforms import Normalization
from mimkit.eval.preflight import check_img_size, source_labels
from mimkit.eval.settings import PRECISIONS, ExtractSettings
from mimkit.files import atomic_write
from mimkit.interop.loading import read_state_dict
from mimkit.interop.timm import resample_encoder_state
from mimkit.models import Backbone, create_backbone, list_backbones, load_backbone
from mimkit.models.backbone import ENCODER_CONFIG, ENCODER_WEIGHTS, OVERRIDABLE

FEATURE_KEYS = ("cls", "patch_mean", "last_cls", "label")  # and "patch_tokens" where asked for


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
    if img_size is not None:
        check_img_size(img_size, model.patch_embed.patch_size[0])
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


def pretrained_and_random_init(
    encoder: str | os.PathLike,
    run: Callable[[Backbone, Callable[..., None] | None], dict[str, Any]],
    extract: ExtractSettings,
    *,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    normalization: Normalization | None = None,
    verbose: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{"pretrained": run(model, log), "random init": run(model, None)}``, one encoder at a time.

    Both are loaded at ``extract.img_size`` on ``extract.device`` (the random init seeded by
    ``seed``); ``log`` is ``print`` for the pretrained run when ``verbose``. The random init runs
    second, so a check that fails fails on the first before the second is built.
    """
    out = {}
    for name, random_init in (("pretrained", False), ("random init", True)):
        model = load_encoder(
            encoder, random_init=random_init, img_size=extract.img_size, checkpoint=checkpoint, seed=seed,
            device=extract.device, normalization=normalization,
        )  # fmt: skip
        out[name] = run(model, print if verbose and name == "pretrained" else None)
        del model
    return out


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
    encoder: Backbone,
    images: torch.Tensor,
    n_last_blocks: int = 1,
    precision: str = "fp32",
    tokens: bool = False,
) -> dict[str, torch.Tensor]:
    """Float32 features of one batch of images (B, C, H, W); see the module docstring for the keys.

    ``tokens`` adds ``patch_tokens``, the last block's final-normed patch tokens (B, N, D).
    """
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
    patches = outs[-1][0].float()
    feats = {"cls": last_cls[:, -1], "patch_mean": patches.mean(dim=1), "last_cls": last_cls}
    if tokens:
        feats["patch_tokens"] = patches
    return feats


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def prefetched(batches: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """``batches`` read by a background thread, up to ``depth`` ahead of the caller.

    Without loader processes the next batch would be drawn, decoded and transformed only after
    the forward pass of the current one returns; in a thread it overlaps it (the forward pass and
    most of the decoding and transforms run in C with the GIL released). Order and content are
    the loader's own; an exception in the thread is raised in the caller at the batch it hit.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def fill() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                slots.put(batch)
            slots.put(end)
        except BaseException as err:  # re-raised in the consumer, whatever it is
            slots.put(_Failure(err))

    thread = threading.Thread(target=fill, name="mimkit-prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not end:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() so the thread sees the stop and ends
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


class _Failure(NamedTuple):
    error: BaseException


class _Collector:
    """Batches of features written into tensors sized for the whole dataset on the first batch.

    One allocation per key instead of a list of batches and a final ``torch.cat``: the peak is the
    result's size, not twice it, which matters for token maps (N x P x D). A dataset without a
    length (a stream) falls back to the list and a final concatenation.
    """

    def __init__(self, total: int | None):
        self.total, self.filled = total, 0
        self.full: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, feats: dict[str, torch.Tensor]) -> None:
        n = len(next(iter(feats.values())))
        for key, value in feats.items():
            if self.total is None:
                self.parts.setdefault(key, []).append(value.cpu())
                continue
            if key not in self.full:
                self.full[key] = torch.empty((self.total, *value.shape[1:]), dtype=value.dtype)
            self.full[key][self.filled : self.filled + n].copy_(value)
        self.filled += n

    def result(self) -> dict[str, torch.Tensor]:
        if self.total is None:
            return {key: torch.cat(values) for key, values in self.parts.items()}
        return {key: value[: self.filled] for key, value in self.full.items()}


@torch.no_grad()
def extract_features(
    encoder: Backbone | Mapping[str, Backbone],
    dataset: Dataset,
    extract: ExtractSettings | None = None,
    *,
    desc: str = "features",
    tokens: bool = False,
) -> dict[str, torch.Tensor] | dict[str, dict[str, torch.Tensor]]:
    """Features of every sample of ``dataset`` (float32 on the CPU), plus ``label`` where it has one.

    ``encoder`` may be a mapping of names to encoders: they then share one pass over the data
    (images decoded and transformed once) and the result maps the same names to features.
    ``extract`` gives the blocks, precision, batch, device, workers and progress bar; the
    dataset's own transform decides the input (``img_size`` and ``cache_dir`` are not read).
    ``tokens`` adds the patch-token maps (``patch_tokens``, N x P x D).
    """
    extract = extract or ExtractSettings()
    device = torch.device(extract.device)
    encoders = dict(encoder) if isinstance(encoder, Mapping) else {"": encoder}
    for model in encoders.values():
        model.to(device).eval()
    # a stream's length is a promise, not an index range: it collects into lists
    total = None if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") else len(dataset)
    collectors = {name: _Collector(total) for name in encoders}
    labels = _Collector(total)
    loader = _loader(dataset, extract.batch_size, extract.workers, device)
    # loader processes already work ahead; without them a thread does
    batches = loader if extract.workers else prefetched(loader)
    steps = len(loader) if hasattr(dataset, "__len__") else None
    for batch in tqdm(batches, desc=desc, total=steps, disable=not extract.progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        for name, model in encoders.items():
            collectors[name].add(encode(model, images, extract.n_last_blocks, extract.precision, tokens))
        if "label" in batch:
            labels.add({"label": batch["label"].long()})
    out = {}
    label = labels.result().get("label")
    for name, collector in collectors.items():
        out[name] = collector.result()
        if label is not None:
            out[name]["label"] = label
    return out if isinstance(encoder, Mapping) else out[""]


def classification_source(uri: str, split: str, transform: Any = None) -> Dataset:
    """``build_source(uri, split, transform)`` without segmentation masks where the source can leave them out.

    Classification features never read the masks of the embedded sets, and cropping and collating
    them cost a fifth of loading a ``synthetic:shapes`` image at 64 px (1.49 against 1.16 ms); the
    images are the same either way.
    """
    dataset = build_source(uri, split, transform)
    if getattr(dataset, "segmentation", False):
        dataset.segmentation = False
    return dataset


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
    encoder: Backbone,
    uri: str,
    split: str,
    transform: Any,
    n_last_blocks: int,
    precision: str = "fp32",
    tokens: bool = False,
) -> str:
    """Hex key of a feature file: encoder weights, source URI, split, transform, blocks, precision,
    and whether it holds the patch-token maps."""
    h = hashlib.sha256()
    parts = [encoder_digest(encoder), uri, split, repr(transform), str(n_last_blocks), precision]
    for part in parts + (["tokens"] if tokens else []):  # keys of token-less files are unchanged
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _cache_path(
    encoder: Backbone, uri: str, split: str, extract: ExtractSettings, tokens: bool = False
) -> Path | None:
    """Where :func:`source_features` keeps ``uri``'s ``split`` (None without a cache directory)."""
    if extract.cache_dir is None:
        return None
    transform = build_transform("eval", extract.image_size(encoder), input_normalization(encoder))
    key = cache_key(encoder, uri, split, transform, extract.n_last_blocks, extract.precision, tokens)
    return Path(extract.cache_dir) / f"{key}.safetensors"


def split_labels(
    encoder: Backbone, uri: str, split: str, extract: ExtractSettings | None = None, dataset: Any = None
) -> torch.Tensor | None:
    """(N,) labels of ``uri``'s ``split`` for checks before extraction, without a forward pass.

    From the feature cache where :func:`source_features` already wrote the split, else read from
    the source as :func:`~mimkit.eval.preflight.source_labels` does (``dataset``: the source,
    already built, with any transform); None for a stream.
    """
    extract = extract or ExtractSettings()
    for tokens in (False, True):
        path = _cache_path(encoder, uri, split, extract, tokens)
        if path is not None and path.is_file():
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("label")
    dataset = dataset if dataset is not None else build_source(uri, split, None)
    return source_labels(dataset, extract.workers)


def source_features(
    encoder: Backbone, uri: str, split: str, extract: ExtractSettings | None = None, *, tokens: bool = False
) -> dict[str, torch.Tensor]:
    """Features of a labelled source's ``split`` under the evaluation transform (centre crop).

    ``extract`` says how (default :class:`~mimkit.eval.settings.ExtractSettings`: the encoder's
    size, the last block, fp32, 256 images per pass on the CPU). With ``extract.cache_dir``,
    features are read from / written to ``cache_dir/<key>.safetensors`` (see :func:`cache_key`;
    written to a temporary name and renamed). Note that the key names the source by its URI, so a
    folder whose images change under the same path needs a fresh cache. ``tokens`` adds the
    patch-token maps (``patch_tokens``, N x P x D float32: the attentive probe's input).
    """
    extract = extract or ExtractSettings()
    transform = build_transform("eval", extract.image_size(encoder), input_normalization(encoder))
    dataset = classification_source(uri, split, transform)
    require_labels(dataset, uri, split)
    path = _cache_path(encoder, uri, split, extract, tokens)
    if path is not None and path.is_file():
        return load_file(str(path))
    with_tokens = _cache_path(encoder, uri, split, extract, True) if not tokens else None
    if with_tokens is not None and with_tokens.is_file():  # the attentive probe's file holds the rest too
        with safe_open(str(with_tokens), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys() if key != "patch_tokens"}  # noqa: SIM118
    feats = extract_features(encoder, dataset, extract, desc=f"features {split}", tokens=tokens)
    feats["num_classes"] = torch.tensor(num_classes_of(dataset, feats["label"]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in feats.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return feats
