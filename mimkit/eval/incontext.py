"""In-context dense evaluation: segmentation by nearest-neighbour retrieval of patches (Hummingbird).

Balazevic et al., "Towards In-context Scene Understanding" (NeurIPS 2023), as open-hummingbird-eval
implements it, with exact search and a streaming metric:

1. **Memory bank.** Each labelled image (the train split) passes through the frozen encoder; every
   patch token after the final norm, L2-normalised, is a key; its value is the patch's per-class
   pixel fraction (from the mask at input resolution, ignored pixels left out; a patch with only
   ignored pixels is not stored). ``aug_epochs`` passes over the images, each with random resized
   crops (area 0.5-1) and horizontal flips. With ``memory_size`` set, every image of every pass
   keeps ``max(1, memory_size // (images x aug_epochs))`` patches, chosen by ``sampler``:
   ``rare`` (open-hummingbird-eval's: score = sum over the classes in the patch of how many of
   the image's patches hold that class, times U(0, 1) noise, lowest kept: rare classes first),
   ``random``, or ``none`` (the first patches in raster order). Kept patches stay in raster order,
   so a quota at least the patch count keeps exactly what an unbounded memory keeps.
2. **Query.** Each val image is resized to ``input x input``; for each patch the k nearest keys by
   cosine (default 30) vote with weights softmax(similarity / T) (T = 0.02) for their values; the
   per-patch class distributions are upsampled bilinearly to the input resolution; argmax.
3. **Metric.** A streaming confusion matrix (:mod:`mimkit.eval.segmetrics`): identity-mapped mIoU
   (primary), Hungarian-matched mIoU (open-hummingbird-eval's number), per-class IoU, pixel accuracy.

Search is exact: chunked matmul + top-k (:mod:`mimkit.eval.retrieval`), fp16 keys on a GPU.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mimkit.data.transforms import Normalization
from mimkit.eval.common import format_table, result, write_json
from mimkit.eval.features import (
    describe_encoder,
    input_normalization,
    pretrained_and_random_init,
)
from mimkit.eval.preflight import MEMORY_HEADROOM, available_bytes, check_fits
from mimkit.eval.retrieval import (
    KEY_DTYPES,
    FaissIndex,
    check_backend,
    default_chunks,
    default_key_dtype,
    search_bytes,
    topk_cosine,
)
from mimkit.eval.seg_data import CROP_RATIO, CROP_SCALE, patch_class_fractions, seg_source
from mimkit.eval.segmetrics import ConfusionMatrix
from mimkit.eval.settings import PRECISIONS, ExtractSettings
from mimkit.models import Backbone

SAMPLERS = ("rare", "random", "none")
DEFAULT_K = 30
DEFAULT_TEMPERATURE = 0.02
DEMO_SOURCE = "synthetic:shapes?size=64&train=256&val=128"
# Dense retrieval keeps every patch token of a batch: 64 images per forward pass by default.
SEG_EXTRACT = ExtractSettings(batch_size=64)


@dataclass
class MemoryBank:
    """Keys (M, D), L2-normalised, in the search dtype; values (M, C) fp16 class fractions."""

    keys: torch.Tensor
    values: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def patch_tokens(encoder: Backbone, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Final-normed patch tokens (B, N, D) in float32, prefix (cls) tokens dropped."""
    dtype = PRECISIONS[precision]
    with (
        torch.no_grad(),
        torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=bool(dtype)),
    ):
        tokens = encoder.forward_features(images)
    return tokens[:, encoder.num_prefix_tokens :].float()


def per_image_quota(memory_size: int | None, num_images: int, aug_epochs: int) -> int | None:
    """Patches kept per image and pass: ``max(1, memory_size // (images x passes))``; None = all."""
    if memory_size is None:
        return None
    return max(1, memory_size // (num_images * aug_epochs))


def select_patches(
    fractions: torch.Tensor, valid: torch.Tensor, quota: int | None, sampler: str, generator: torch.Generator
) -> torch.Tensor:
    """Which patches (B, N) of each image enter the memory; see the module docstring for ``sampler``."""
    b, n, _ = fractions.shape
    if quota is None or quota >= n:
        return valid
    noise = torch.rand(b, n, generator=generator).to(fractions.device)
    if sampler == "rare":
        present = (fractions > 0).float()
        patches_per_class = present.sum(1, keepdim=True)  # (B, 1, C)
        score = (present * patches_per_class).sum(-1) * noise
    elif sampler == "random":
        score = noise
    else:
        score = torch.arange(n, device=fractions.device, dtype=torch.float32).expand(b, n)
    score = score.masked_fill(~valid, math.inf)
    chosen = score.topk(quota, dim=1, largest=False).indices
    keep = torch.zeros_like(valid).scatter_(1, chosen, True)
    return keep & valid


def _loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),  # seeds the workers' augmentation
    )


def _check_settings(
    sampler: str, aug_epochs: int, memory_size: int | None, k: int, temperature: float
) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    if aug_epochs < 1:
        raise ValueError(f"aug_epochs={aug_epochs} must be at least 1")
    if memory_size is not None and memory_size < 1:
        raise ValueError(f"memory_size={memory_size} must be positive (or None for every patch)")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")


@torch.no_grad()
def build_memory(
    encoder: Backbone,
    dataset: Dataset,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    memory_size: int | None = None,
    aug_epochs: int = 1,
    sampler: str = "rare",
    seed: int = 0,
    key_dtype: str | None = None,
    extract: ExtractSettings | None = None,
) -> MemoryBank:
    """The memory bank of ``dataset`` (samples with ``image`` and ``mask``), on ``extract.device``.

    ``dataset``'s own transform decides the input and its augmentation; each of the
    ``aug_epochs`` passes draws it from ``seed + pass`` (torch's RNG, forked so the caller's is
    untouched). ``extract`` (default 64 images per pass) gives precision, batch, device, workers
    and progress.
    """
    _check_settings(sampler, aug_epochs, memory_size, 1, 1.0)
    extract = extract or SEG_EXTRACT
    device = torch.device(extract.device)
    key_dtype = key_dtype or default_key_dtype(device)
    if key_dtype not in KEY_DTYPES:
        raise ValueError(f"unknown key dtype {key_dtype!r}; valid: {', '.join(KEY_DTYPES)}")
    patch = encoder.patch_embed.patch_size[0]
    n = math.prod(encoder.patch_embed.grid_size)
    quota = per_image_quota(memory_size, len(dataset), aug_epochs)
    capacity = len(dataset) * aug_epochs * (n if quota is None else min(quota, n))
    keys = torch.empty(capacity, encoder.embed_dim, dtype=KEY_DTYPES[key_dtype], device=device)
    values = torch.empty(capacity, num_classes, dtype=torch.float16, device=device)
    filled = 0
    gen = torch.Generator().manual_seed(seed)
    encoder.to(device).eval()
    for epoch in range(aug_epochs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + epoch)
            batches = _loader(dataset, extract.batch_size, extract.workers, device, seed + epoch)
            desc = f"memory pass {epoch + 1}/{aug_epochs}"
            for batch in tqdm(batches, desc=desc, disable=not extract.progress, leave=False):
                images = batch["image"].to(device, non_blocking=True)
                tokens = patch_tokens(encoder, images, extract.precision)
                if tokens.shape[1] != n:
                    raise ValueError(
                        f"images of {tuple(images.shape[-2:])} px give {tokens.shape[1]} patches, not {n}"
                    )
                fractions, valid = patch_class_fractions(
                    batch["mask"].to(device), patch, num_classes, ignore_index
                )
                keep = select_patches(fractions, valid, quota, sampler, gen)
                count = int(keep.sum())
                keys[filled : filled + count] = F.normalize(tokens[keep], dim=-1).to(keys.dtype)
                values[filled : filled + count] = fractions[keep].half()
                filled += count
    info = {
        "patches": filled,
        "capacity": capacity,
        "images": len(dataset),
        "aug_epochs": aug_epochs,
        "patches_per_image": quota if quota is not None and quota < n else n,
        "patches_per_image_available": n,
        "memory_size": memory_size,
        "sampler": sampler if quota is not None and quota < n else "none (every valid patch kept)",
        "key_dtype": key_dtype,
    }
    return MemoryBank(keys[:filled], values[:filled], info)


@torch.no_grad()
def patch_distributions(
    queries: torch.Tensor,
    memory: MemoryBank,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    index: FaissIndex | None = None,
    query_chunk: int | None = None,
    key_chunk: int | None = None,
) -> torch.Tensor:
    """Class distributions (Q, C) of L2-normalised queries (Q, D).

    Each is the softmax(similarity / T)-weighted mean of the values of its k nearest keys.
    """
    if k > len(memory):
        raise ValueError(f"k={k} exceeds the {len(memory)} patches in the memory bank")
    qc = query_chunk or default_chunks(queries.device)[0]
    out = torch.empty(len(queries), memory.values.shape[1], device=queries.device)
    for q0 in range(0, len(queries), qc):
        q = queries[q0 : q0 + qc]
        if index is not None:
            sims, idx = index.search(q, k)
        else:
            sims, idx = topk_cosine(q, memory.keys, k, query_chunk=qc, key_chunk=key_chunk)
        weights = (sims / temperature).softmax(dim=1)
        vals = memory.values[idx.to(memory.values.device)].to(q.device).float()  # (q, k, C)
        out[q0 : q0 + qc] = torch.einsum("qk,qkc->qc", weights, vals)
    return out


def upsample_argmax(
    distributions: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Per-patch distributions (B, N, C) -> bilinear upsampling to ``size`` -> argmax: classes (B, H, W).

    One image at a time, so 150 classes at 512 px stay at 150 MB whatever the batch.
    """
    preds = []
    for dist in distributions:
        grid_dist = dist.T.reshape(1, -1, *grid)
        up = F.interpolate(grid_dist, size=size, mode="bilinear", align_corners=False)
        preds.append(up[0].argmax(0))
    return torch.stack(preds)


@torch.no_grad()
def evaluate_memory(
    encoder: Backbone,
    memory: MemoryBank,
    dataset: Dataset,
    num_classes: int,
    ignore_index: int | None = None,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    backend: str = "torch",
    query_chunk: int | None = None,
    key_chunk: int | None = None,
    extract: ExtractSettings | None = None,
) -> ConfusionMatrix:
    """Label every val image of ``dataset`` from ``memory`` and count it into a confusion matrix.

    ``extract`` (default 64 images per pass) gives precision, batch, device, workers and progress.
    """
    _check_settings("none", 1, None, k, temperature)
    check_backend(backend)
    extract = extract or SEG_EXTRACT
    device = torch.device(extract.device)
    index = FaissIndex(memory.keys) if backend == "faiss" else None
    conf = ConfusionMatrix(num_classes, ignore_index, device=device)
    grid = tuple(encoder.patch_embed.grid_size)
    encoder.to(device).eval()
    loader = _loader(dataset, extract.batch_size, extract.workers, device, 0)
    for batch in tqdm(loader, desc="queries", disable=not extract.progress, leave=False):
        images = batch["image"].to(device, non_blocking=True)
        tokens = patch_tokens(encoder, images, extract.precision)
        b, n, d = tokens.shape
        queries = F.normalize(tokens.reshape(b * n, d), dim=-1)
        dist = patch_distributions(
            queries,
            memory,
            k=k,
            temperature=temperature,
            index=index,
            query_chunk=query_chunk,
            key_chunk=key_chunk,
        )
        pred = upsample_argmax(dist.view(b, n, -1), grid, tuple(images.shape[-2:]))
        conf.update(pred, batch["mask"].to(device))
    return conf


def memory_plan(
    encoder: Backbone,
    num_images: int,
    num_classes: int,
    *,
    memory_size: int | None,
    aug_epochs: int,
    k: int,
    key_dtype: str,
    device: str | torch.device,
    query_chunk: int | None = None,
    key_chunk: int | None = None,
) -> dict[str, Any]:
    """How many patches the memory will hold (at most) and the bytes the search will need."""
    n = math.prod(encoder.patch_embed.grid_size)
    quota = per_image_quota(memory_size, num_images, aug_epochs)
    patches = num_images * aug_epochs * (n if quota is None else min(quota, n))
    qc, kc = default_chunks(device)
    need = search_bytes(
        patches, encoder.embed_dim, num_classes, key_dtype, query_chunk or qc, key_chunk or kc, k
    )
    return {
        "max_patches": patches,
        "dim": encoder.embed_dim,
        "bytes": need,
        "total_bytes": sum(need.values()),
    }


def check_plan(plan: dict[str, Any], k: int, key_dtype: str, device: str | torch.device) -> None:
    """Fail before the first forward pass when the memory bank cannot serve ``k`` neighbours or
    would not fit in the free memory of ``device``; the error names the ``--memory-size`` that fits."""
    if k > plan["max_patches"]:
        raise ValueError(
            f"--k {k} exceeds the {plan['max_patches']:,} patches the memory bank can hold; the largest "
            f"valid is {plan['max_patches']} (or raise --memory-size / use more training images)"
        )
    b = plan["bytes"]
    per_patch = (b["keys"] + b["values"]) / max(plan["max_patches"], 1)
    free = available_bytes(device)
    fits = int((MEMORY_HEADROOM * free - b["block"] - b["topk"]) // per_patch) if free is not None else None
    smaller_keys = ", or --key-dtype fp16 (half the key bytes)" if key_dtype == "fp32" else ""
    advice = (
        f"pass --memory-size {max(fits, 0):,} or smaller{smaller_keys}"
        if fits is not None and fits >= k
        else f"free memory on {device}, or use a smaller --query-chunk / --key-chunk{smaller_keys}"
    )
    check_fits(
        plan["total_bytes"],
        device,
        f"the memory bank ({plan['max_patches']:,} patches x {plan['dim']} dims, {key_dtype} keys, "
        "with its values and search blocks)",
        advice,
    )


def check_incontext(
    encoder: Backbone,
    train_source: str,
    val_source: str | None = None,
    *,
    memory_size: int | None = None,
    aug_epochs: int = 1,
    k: int = DEFAULT_K,
    key_dtype: str | None = None,
    device: str | torch.device = "cpu",
    query_chunk: int | None = None,
    key_chunk: int | None = None,
) -> dict[str, Any]:
    """The checks :func:`incontext_segmentation` runs before its first forward pass, alone: both
    sources carry masks of the same classes, and the memory bank serves ``k`` and fits on
    ``device``. For a tool that runs other protocols first (``compare-random --seg``). Returns the plan."""
    _check_settings("none", aug_epochs, memory_size, k, 1.0)
    key_dtype = key_dtype or default_key_dtype(device)
    size = encoder.patch_embed.img_size[0]
    mem_data, names, ignore = seg_source(train_source, "train", "val", size)
    _, val_names, val_ignore = seg_source(val_source or train_source, "val", "val", size)
    if (names, ignore) != (val_names, val_ignore):
        raise ValueError(f"{train_source!r} and {val_source!r} have different classes or ignore labels")
    plan = memory_plan(
        encoder, len(mem_data), len(names), memory_size=memory_size, aug_epochs=aug_epochs, k=k,
        key_dtype=key_dtype, device=device, query_chunk=query_chunk, key_chunk=key_chunk,
    )  # fmt: skip
    check_plan(plan, k, key_dtype, device)
    return plan


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def describe_plan(plan: dict[str, Any], key_dtype: str, device: str | torch.device) -> str:
    """One line stating the memory a run will need, printed before it starts."""
    b = plan["bytes"]
    return (
        f"memory bank: up to {plan['max_patches']:,} patches x {plan['dim']} dims ({key_dtype} keys) "
        f"on {device}: "
        f"keys {_gib(b['keys'])} + values {_gib(b['values'])} + search blocks {_gib(b['block'] + b['topk'])} "
        f"= {_gib(plan['total_bytes'])}"
    )


def incontext_segmentation(
    encoder: Backbone,
    train_source: str,
    val_source: str | None = None,
    *,
    memory_size: int | None = None,
    aug_epochs: int = 1,
    augment: bool = True,
    sampler: str = "rare",
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    backend: str = "torch",
    key_dtype: str | None = None,
    seed: int = 0,
    query_chunk: int | None = None,
    key_chunk: int | None = None,
    extract: ExtractSettings | None = None,
    log=print,
) -> dict[str, Any]:
    """Dense nearest-neighbour retrieval segmentation of ``encoder`` (see the module docstring).

    The memory is built from ``train_source``'s train split, the queries are ``val_source``'s
    (default: the same source's) val split, at the encoder's input size. ``augment=False`` builds
    the memory from resized images instead of random crops and flips. ``extract`` (default
    :data:`SEG_EXTRACT`, 64 images per pass) gives precision, batch, device, workers and progress;
    its ``img_size``, when set, must be the encoder's (load the encoder at the size you evaluate
    at), and there is no feature cache (the memory is rebuilt from augmented images). ``log``
    receives the memory plan before anything is computed (``None`` to stay quiet). Returns a
    result dict.
    """
    start = time.perf_counter()
    _check_settings(sampler, aug_epochs, memory_size, k, temperature)
    check_backend(backend)
    extract = extract or SEG_EXTRACT
    img_size = encoder.patch_embed.img_size[0]
    if extract.img_size not in (None, img_size):
        raise ValueError(
            f"img_size={extract.img_size} differs from the encoder's input size {img_size}; load the "
            f"encoder at that size (load_encoder(..., img_size={extract.img_size}))"
        )
    if extract.cache_dir is not None:
        raise ValueError(
            f"cache_dir={str(extract.cache_dir)!r} does not apply to in-context segmentation: the memory "
            "bank is rebuilt from augmented images"
        )
    extract = replace(extract, img_size=img_size)
    device = extract.device
    val_source = val_source or train_source
    key_dtype = key_dtype or default_key_dtype(device)
    patch = encoder.patch_embed.patch_size[0]
    norm = input_normalization(encoder)
    mem_data, names, ignore = seg_source(
        train_source, "train", "memory" if augment else "val", img_size, norm
    )
    val_data, val_names, val_ignore = seg_source(val_source, "val", "val", img_size, norm)
    if (names, ignore) != (val_names, val_ignore):
        raise ValueError(f"{train_source!r} and {val_source!r} have different classes or ignore labels")
    plan = memory_plan(
        encoder, len(mem_data), len(names), memory_size=memory_size, aug_epochs=aug_epochs, k=k,
        key_dtype=key_dtype, device=device, query_chunk=query_chunk, key_chunk=key_chunk,
    )  # fmt: skip
    if log is not None:
        log(describe_plan(plan, key_dtype, device))
    check_plan(plan, k, key_dtype, device)
    memory = build_memory(
        encoder, mem_data, len(names), ignore, memory_size=memory_size, aug_epochs=aug_epochs,
        sampler=sampler, seed=seed, key_dtype=key_dtype, extract=extract,
    )  # fmt: skip
    built = time.perf_counter()
    conf = evaluate_memory(
        encoder, memory, val_data, len(names), ignore, k=k, temperature=temperature, backend=backend,
        query_chunk=query_chunk, key_chunk=key_chunk, extract=extract,
    )  # fmt: skip
    metrics = conf.summary(names)
    settings = {
        "input_size": img_size,
        "patch_size": patch,
        "memory_size": memory_size,
        "patches_per_image": memory.info["patches_per_image"],
        "aug_epochs": aug_epochs,
        "augmentation": (
            f"RandomResizedCrop(scale={CROP_SCALE}, ratio=({CROP_RATIO[0]:.3f}, {CROP_RATIO[1]:.3f}), "
            "bilinear; mask nearest) + horizontal flip"
            if augment
            else "none (resize to input size)"
        ),
        "sampler": memory.info["sampler"],
        "k": k,
        "temperature": temperature,
        "similarity": "cosine of L2-normalised final-normed patch tokens",
        "weights": "softmax(similarity / temperature) over the k neighbours",
        "upsampling": "bilinear (align_corners=False) of the per-patch class distributions, then argmax",
        "values": "per-class fraction of the patch's non-ignored pixels; fully ignored patches not stored",
        "ignore_index": ignore,
        "normalisation": norm.to_dict(),
        "val_transform": f"resize to {img_size}x{img_size} (bilinear, aspect not kept); scored at that size",
        "backend": backend,
        "key_dtype": key_dtype,
        "search": "exact inner product, chunked matmul + top-k"
        if backend == "torch"
        else "faiss IndexFlatIP",
        "precision": extract.precision,
        "seed": seed,
        "extract": extract.to_dict(),
    }
    data = {
        "train": f"{train_source} [train split]",
        "val": f"{val_source} [val split]",
        "num_train": len(mem_data),
        "num_val": len(val_data),
        "num_classes": len(names),
        "class_names": list(names),
    }
    results = {
        **metrics,
        "memory_patches": len(memory),
        "memory_bytes_planned": plan["total_bytes"],
        "seconds_memory": round(built - start, 2),
        "seconds_query": round(time.perf_counter() - built, 2),
    }
    return result(
        "incontext", "dense-nn-retrieval (hummingbird)", describe_encoder(encoder), data, settings, results
    )


def format_segmentation(res: dict[str, Any]) -> str:
    """The human table of an :func:`incontext_segmentation` result (mIoU etc. in %)."""
    r, s, enc = res["results"], res["settings"], res["encoder"]
    title = (
        f"in-context segmentation (dense NN retrieval, k={s['k']}, T={s['temperature']:g}) of {enc['spec']}"
        + (" [random init]" if enc.get("random_init") else "")
    )
    rows = [
        ["mIoU % (identity)", 100 * r["miou"]],
        ["mIoU % (Hungarian)", 100 * r["miou_hungarian"]],
        ["pixel accuracy %", 100 * r["pixel_accuracy"]],
    ]
    rows += [[f"  IoU % {name}", "-" if v is None else 100 * v] for name, v in r["per_class_iou"].items()]
    foot = (
        f"memory {r['memory_patches']:,} patches ({s['aug_epochs']} pass(es), "
        f"{s['patches_per_image']} per image, "
        f"sampler {s['sampler']}); {res['data']['num_val']} val images at {s['input_size']} px."
    )
    return f"{format_table(['metric', 'value'], rows, title)}\n{foot}"


def compare_incontext(
    encoder: str | os.PathLike,
    train_source: str = DEMO_SOURCE,
    val_source: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
    normalization: Normalization | None = None,
    extract: ExtractSettings | None = None,
    json_path: str | os.PathLike | None = None,
    verbose: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Dense retrieval mIoU of ``encoder`` and of a random init of its shape, side by side (the demo's).

    Both encoders are loaded at ``extract.img_size`` (default: the export's) on ``extract.device``;
    ``kwargs`` go to :func:`incontext_segmentation` (``memory_size``, ``aug_epochs``, ``k``, ...);
    ``normalization`` replaces the encoder's recorded input normalisation (both encoders).
    Returns ``{"pretrained": result, "random init": result}``; prints the table when ``verbose``.
    """
    extract = extract or SEG_EXTRACT

    def run(model, log):
        return incontext_segmentation(
            model, train_source, val_source, seed=seed, extract=extract, log=log, **kwargs
        )

    out = pretrained_and_random_init(
        encoder, run, extract, checkpoint=checkpoint, seed=seed, normalization=normalization, verbose=verbose
    )
    if json_path is not None:
        write_json(json_path, out)
    if verbose:
        print(format_comparison(out), flush=True)
    return out


def format_comparison(res: dict[str, Any]) -> str:
    """Side-by-side table of a :func:`compare_incontext` result."""
    names = list(res)
    first = res[names[0]]
    rows = [
        ["mIoU % (identity)"] + [100 * res[n]["results"]["miou"] for n in names],
        ["mIoU % (Hungarian)"] + [100 * res[n]["results"]["miou_hungarian"] for n in names],
        ["pixel accuracy %"] + [100 * res[n]["results"]["pixel_accuracy"] for n in names],
    ]
    s, d = first["settings"], first["data"]
    title = (
        f"in-context segmentation of {first['encoder']['spec']} vs a random init: memory "
        f"{first['results']['memory_patches']:,} patches from {d['num_train']} images, "
        f"{d['num_val']} val images, "
        f"{s['input_size']} px, k={s['k']}, T={s['temperature']:g}"
    )
    return format_table(["", *names], rows, title)
