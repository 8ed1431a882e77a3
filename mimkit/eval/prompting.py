"""Visual prompting by inpainting: segmentation from one painted canvas (Bar et al., NeurIPS 2022).

For each query a 2x2 canvas at the model's input size (:mod:`mimkit.ssl.canvas`): top row a
support image and its label as a fixed colour map, bottom row the query and its masked answer
quadrant. The whole method (encoder and pixel decoder, from a pretraining run directory) paints
the masked patches; the answer cell is de-normalised, averaged over ``shots`` canvases with
different supports, resized bilinearly to the query's label size and decoded by nearest palette
colour (binary foreground: mean intensity above 0.5). Two tasks:

- ``fg`` (Pascal-5i's foreground segmentation): per query one class present in it (not
  background 0, not ignored) is drawn; supports are images holding that class; labels are that
  class white on black. Score: the mean over episodes of the per-episode foreground IoU (Bar et
  al.'s number), the pooled foreground IoU and the binary mIoU.
- ``semantic``: every class in its palette colour; the mIoU (identity mapping) and pixel accuracy
  of a streaming confusion matrix (:mod:`mimkit.eval.segmetrics`), as Painter scores ADE20K.

Supports are drawn from a pool of the train split, at random (seeded) or as the query's nearest
images by cosine of the encoder's mean-pooled, final-normed patch tokens (Zhang et al.'s
unsupervised prompt retrieval). A model trained with ``norm_pix_loss`` predicts each patch up to
its own mean and scale and cannot paint absolute colours: it is refused before anything loads.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from mimkit.data.transforms import Normalization
from mimkit.eval.common import format_table, result
from mimkit.eval.features import describe_encoder
from mimkit.eval.seg_data import seg_source
from mimkit.eval.segmetrics import ConfusionMatrix
from mimkit.ssl import canvas as cv
from mimkit.ssl.masking import ids_keep
from mimkit.ssl.painter import foreground_of
from mimkit.ssl.targets import unpatchify

TASKS = ("fg", "semantic")
SELECTIONS = ("random", "nearest")
DEMO_SOURCE = "synthetic:textures?size=64&train=4096&val=512&seed=0&cache=1&segmentation=1"
NORM_PIX_KEY = "method.norm_pix_loss=false"


# ----------------------------------------------------------------------------- the model


def check_paintable(method_cfg: dict[str, Any], where: str = "") -> None:
    """Refuse a method that cannot paint absolute colours, from its recipe entry alone."""
    from mimkit.ssl.registry import method_class, method_options

    name = method_cfg.get("name", "mae")
    options = {**method_options(name), **method_cfg}
    if options.get("norm_pix_loss", False):
        raise ValueError(
            f"{where}the {name!r} model was trained with norm_pix_loss: its decoder predicts each patch "
            "up to its own mean and scale, so it cannot paint the absolute colours a prompt canvas is "
            f"read by. Pretrain with {NORM_PIX_KEY} (e.g. recipes/demo/mae_rawpix_vit_tiny.yaml), or convert "
            "an official plain-pixel checkpoint (mae_visualize_*.pth) with --keep-decoder --no-norm-pix"
        )
    cls = method_class(name)
    if not (hasattr(cls, "paint") or name == "mae"):
        raise ValueError(f"{where}method {name!r} has no pixel decoder to paint with; valid: mae, painter")


def paint(method: torch.nn.Module, canvases: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Painted canvases (B, C, side, side) from ``method`` with patches ``mask`` (B, L) hidden."""
    own = getattr(method, "paint", None)
    if own is not None:
        return own(canvases, mask)
    keep = ids_keep(mask)
    pred = method.decoder(method.encoder.forward_visible(canvases, keep), keep)
    return unpatchify(pred, method.encoder.patch_size, method.encoder.grid_size)


def load_prompt_model(
    run_dir: str | os.PathLike, random_init: bool = False, seed: int = 0, device: str = "cpu"
) -> tuple[torch.nn.Module, Normalization, dict[str, Any]]:
    """``(method, input normalisation, recipe's method entry)`` of a finished run, checked first.

    ``random_init`` builds the same method untrained (seeded), the floor of the protocol.
    """
    from mimkit.ssl import build_method
    from mimkit.train.config import load_recipe
    from mimkit.train.trainer import MODEL_FILE, RECIPE_FILE, load_method

    run_dir = Path(run_dir)
    recipe_path = run_dir / RECIPE_FILE
    if not recipe_path.is_file():
        raise FileNotFoundError(
            f"{recipe_path} not found: --run needs a pretraining run directory (the whole method, decoder "
            "included; an encoder export has no decoder to paint with)"
        )
    recipe = load_recipe(recipe_path, check_data=False)
    method_cfg = recipe.method.to_dict()
    check_paintable(method_cfg, where=f"{run_dir}: ")
    if random_init:
        torch.manual_seed(seed)
        method = build_method(method_cfg).eval()
    else:
        if not (run_dir / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / MODEL_FILE} not found; has the run finished?")
        method = load_method(run_dir)
    if method.encoder.in_chans != 3:
        raise ValueError(
            f"prompt canvases are in colour; the encoder reads {method.encoder.in_chans} channel(s)"
        )
    norm = Normalization.from_dict(recipe.normalization.to_dict(), 3)
    method.encoder.normalization = norm.to_dict()
    method.encoder.origin = {
        "spec": str(run_dir),
        "random_init": random_init,
        "seed": seed if random_init else None,
    }
    return method.to(device).eval().requires_grad_(False), norm, method_cfg


def paint_answers(
    method: torch.nn.Module,
    norm: Normalization,
    support_images: torch.Tensor,
    support_outputs: torch.Tensor,
    query_images: torch.Tensor,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paint the answers of one canvas per query.

    Args:
        support_images, query_images: (B, 3, H, W) in input normalisation, at any size.
        support_outputs: (B, 3, cell, cell) rendered labels in [0, 1] (a :class:`~cv.Palette`'s).

    Returns:
        ``(answers, canvases, painted)``: the painted answer cells (B, 3, cell, cell) in [0, 1] on
        the CPU, the input canvases and the painted canvases (normalised, on ``device``).
    """
    side = method.encoder.patch_embed.img_size[0]
    sep = int(getattr(method, "separator", 1))
    cell = cv.cell_size(side, sep)
    cells = {
        "support_image": cv.resize_images(support_images, cell),
        "support_output": cv.normalize(support_outputs, norm),
        "query_image": cv.resize_images(query_images, cell),
    }
    canvases = cv.stitch(cells, side, sep, cv.separator_value(norm)).to(device)
    answer = cv.answer_patch_mask(method.encoder.grid_size).to(canvases.device)
    painted = paint(method, canvases, answer.expand(len(canvases), -1)).float()
    return cv.denormalize(cv.crop_cell(painted, "answer", sep), norm).cpu(), canvases, painted


# ----------------------------------------------------------------------------- data


def _stack(dataset, indices, batch_size: int, desc: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False)
    images, masks = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images.append(batch["image"])
        masks.append(batch["mask"].long())
    return torch.cat(images), torch.cat(masks)


@torch.no_grad()
def image_features(method, images: torch.Tensor, batch_size: int, device: str) -> torch.Tensor:
    """L2-normalised mean of the final-normed patch tokens, (N, D), at the encoder's input size."""
    enc = method.encoder
    side = enc.patch_embed.img_size[0]
    out = []
    for chunk in images.split(batch_size):
        x = cv.resize_images(chunk.to(device), side)
        tokens = enc.forward_features(x)[:, enc.num_prefix_tokens :]
        out.append(F.normalize(tokens.mean(1).float(), dim=-1).cpu())
    return torch.cat(out)


def class_presence(masks: torch.Tensor, num_classes: int, ignore: int | None) -> torch.Tensor:
    """(N, C) bool: whether each mask holds each class (ignored pixels left out)."""
    flat = masks.reshape(len(masks), -1)
    valid = (flat >= 0) & (flat < num_classes)
    if ignore is not None:
        valid &= flat != ignore
    present = torch.zeros(len(masks), num_classes, dtype=torch.bool)
    present.scatter_(1, flat.clamp(0, num_classes - 1) * valid, valid)
    return present


def choose_supports(
    candidates: torch.Tensor, shots: int, selection: str, similarity: torch.Tensor | None, g: torch.Generator
) -> torch.Tensor:
    """``shots`` support indices from the bool (P,) ``candidates`` (repeating when too few)."""
    pool = candidates.nonzero()[:, 0]
    if len(pool) == 0:
        pool = torch.arange(len(candidates))
    if selection == "nearest":
        order = pool[similarity[pool].argsort(descending=True)]
    else:
        order = pool[torch.randperm(len(pool), generator=g)]
    return order[torch.arange(shots) % len(order)]


# ----------------------------------------------------------------------------- the protocol


SETTING_KEYS = ("tasks", "shots", "selection", "num_queries", "pool_size", "batch_size")


def _check_settings(
    tasks=TASKS, shots=1, selection="random", seeds=(0,), num_queries=None, pool_size=None, batch_size=1
) -> None:
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"tasks {bad or tasks}: valid: {', '.join(TASKS)}")
    if selection not in SELECTIONS:
        raise ValueError(f"support selection {selection!r}; valid: {', '.join(SELECTIONS)}")
    for name, value in (("shots", shots), ("batch_size", batch_size), ("pool_size", pool_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be positive")
    if num_queries is not None and num_queries < 1:
        raise ValueError(f"num_queries={num_queries} must be positive")
    if not seeds:
        raise ValueError("give at least one seed")


def prompt_segmentation(
    run_dir: str | os.PathLike,
    train: str,
    val: str | None = None,
    *,
    random_init: bool = False,
    seeds: tuple[int, ...] = (0,),
    device: str = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """Score a run's method at visual prompting on ``val``'s queries with ``train``'s supports.

    The run's recipe is checked (:func:`check_paintable`) before anything loads; ``options`` are
    those of :func:`evaluate_prompting`.
    """
    _check_settings(seeds=seeds, **{k: options[k] for k in SETTING_KEYS if k in options})
    method, norm, method_cfg = load_prompt_model(run_dir, random_init, seeds[0], device)
    res = evaluate_prompting(method, norm, train, val, seeds=seeds, device=device, **options)
    res["encoder"]["run_dir"] = str(run_dir)
    res["settings"]["method"] = method_cfg.get("name")
    return res


@torch.no_grad()
def evaluate_prompting(
    method: torch.nn.Module,
    norm: Normalization,
    train: str,
    val: str | None = None,
    *,
    tasks: tuple[str, ...] = TASKS,
    shots: int = 1,
    selection: str = "random",
    seeds: tuple[int, ...] = (0,),
    num_queries: int | None = None,
    pool_size: int | None = 1000,
    pool_split: str = "train",
    label_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    examples: int = 4,
    png: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Visual prompting of a loaded ``method`` (``encoder`` plus ``paint`` or MAE's decoder).

    Supports come from ``pool_size`` images of ``train``'s ``pool_split`` split, queries are the
    first ``num_queries`` of ``val``'s val split, scored at ``label_size`` (the canvas side by
    default). Returns a result dict (:func:`mimkit.eval.common.result`); ``results`` holds per
    task the mean over seeds (and ``per_seed``) of ``fg_iou`` / ``fg_iou_pooled`` /
    ``binary_miou`` or ``miou`` / ``pixel_acc``, in percent; for ``fg`` also ``fg_iou_by_class``
    (the episodes' mean IoU per foreground class, Pascal-5i's per-class view, which shows what a
    model fails on) and ``episodes_by_class`` (episodes per seed).
    """
    _check_settings(tasks, shots, selection, seeds, num_queries, pool_size, batch_size)
    val = val or train
    side = method.encoder.patch_embed.img_size[0]
    cv.answer_patch_mask(method.encoder.grid_size)
    sep = int(getattr(method, "separator", 1))
    cell = cv.cell_size(side, sep)
    label_size = label_size or side
    start = time.time()
    pool_set, names, ignore = seg_source(train, pool_split, "val", label_size, norm)
    query_set, _, _ = seg_source(val, "val", "val", label_size, norm)
    num_classes = len(names)
    trained_classes = getattr(method, "num_classes", None)
    if trained_classes is not None and "semantic" in tasks and trained_classes != num_classes:
        print(
            f"[mimkit] the painter was trained with a {trained_classes}-class palette, the data have "
            f"{num_classes} classes: semantic colours differ from training"
        )
    g = torch.Generator().manual_seed(seeds[0])
    pool_n = min(len(pool_set), pool_size or len(pool_set))
    pool_idx = torch.randperm(len(pool_set), generator=g)[:pool_n].tolist()
    query_n = min(len(query_set), num_queries or len(query_set))
    pool_images, pool_masks = _stack(pool_set, pool_idx, batch_size, "support pool", progress)
    query_images, query_masks = _stack(query_set, list(range(query_n)), batch_size, "queries", progress)
    presence = class_presence(pool_masks, num_classes, ignore)
    similarity = None
    if selection == "nearest":
        similarity = (
            image_features(method, query_images, batch_size, device)
            @ image_features(method, pool_images, batch_size, device).T
        )
    palettes = {"fg": cv.Palette(2, binary=True), "semantic": cv.Palette(num_classes)}
    shown: list[torch.Tensor] = []

    def render(task: str, masks: torch.Tensor, fg: torch.Tensor | None) -> torch.Tensor:
        if task == "fg":
            binary = (masks == fg[:, None, None]).long()
            if ignore is not None:
                binary = torch.where(masks == ignore, masks.new_tensor(ignore), binary)
            masks = binary
        return palettes[task].render(masks, ignore)

    per_seed: dict[str, list[dict[str, float]]] = {t: [] for t in tasks}
    for seed in seeds:
        for task in tasks:
            g = torch.Generator().manual_seed(seed)
            fg_all = foreground_of(query_masks, ignore, g) if task == "fg" else None
            conf = ConfusionMatrix(2 if task == "fg" else num_classes, ignore)
            episode_iou: list[float] = []
            episode_class: list[int] = []
            all_fg_iou: list[float] = []  # what painting everything foreground scores
            bar = tqdm(total=query_n, desc=f"{task} seed {seed}", disable=not progress, leave=False)
            for lo in range(0, query_n, batch_size):
                hi = min(lo + batch_size, query_n)
                q_img, q_mask = query_images[lo:hi], query_masks[lo:hi]
                fg = fg_all[lo:hi] if fg_all is not None else None
                candidates = presence[:, fg].T if fg is not None else torch.ones(hi - lo, pool_n, dtype=bool)
                sims = similarity[lo:hi] if similarity is not None else [None] * (hi - lo)
                support = torch.stack(
                    [choose_supports(candidates[i], shots, selection, sims[i], g) for i in range(hi - lo)]
                )  # (b, shots)
                painted = 0.0
                for s in range(shots):
                    sup = support[:, s]
                    outputs = render(task, cv.resize_labels(pool_masks[sup], cell), fg)
                    images = pool_images[sup]
                    answers, canvas, out = paint_answers(method, norm, images, outputs, q_img, device)
                    painted = painted + answers
                    if seed == seeds[0] and s == 0 and len(shown) < examples * len(tasks) and lo == 0:
                        keep = min(examples, len(canvas))
                        done = canvas.clone()
                        top, left = cv.cell_offsets(side, sep)["answer"]
                        done[..., top:, left:] = out[..., top:, left:]
                        shown.extend(cv.denormalize(done[:keep].cpu(), norm))
                painted = painted / shots
                resized = F.interpolate(painted, size=q_mask.shape[-2:], mode="bilinear", align_corners=False)
                pred = palettes[task].decode(resized)
                target = q_mask
                if task == "fg":
                    target = (q_mask == fg[:, None, None]).long()
                    if ignore is not None:
                        target = torch.where(q_mask == ignore, q_mask.new_tensor(ignore), target)
                    for p, t, c in zip(pred, target, fg.tolist()):
                        valid = t != ignore if ignore is not None else torch.ones_like(t, dtype=bool)
                        inter = ((p == 1) & (t == 1) & valid).sum().item()
                        union = (((p == 1) | (t == 1)) & valid).sum().item()
                        episode_iou.append(inter / union if union else 1.0)
                        episode_class.append(c)
                        truth, area = ((t == 1) & valid).sum().item(), valid.sum().item()
                        all_fg_iou.append(truth / area if area else 1.0)
                conf.update(pred, target)
                bar.update(hi - lo)
            bar.close()
            if task == "fg":
                iou = conf.iou()
                scores = {
                    "fg_iou": 100 * sum(episode_iou) / max(len(episode_iou), 1),
                    "fg_iou_pooled": 100 * float(iou[1]),
                    "binary_miou": 100 * conf.miou(),
                    "fg_iou_all_foreground": 100 * sum(all_fg_iou) / max(len(all_fg_iou), 1),
                    "fg_iou_by_class": _mean_by_class(episode_iou, episode_class, names),
                    "episodes_by_class": {names[c]: n for c, n in sorted(Counter(episode_class).items())},
                }
            else:
                scores = {"miou": 100 * conf.miou(), "pixel_acc": 100 * conf.pixel_accuracy()}
            per_seed[task].append(scores)

    results: dict[str, Any] = {}
    for task, runs in per_seed.items():
        entry: dict[str, Any] = {}
        for key in runs[0]:
            if isinstance(runs[0][key], dict):  # per class: the mean over the seeds that drew it
                seen = dict.fromkeys(n for r in runs for n in r[key])
                entry[key] = {n: statistics.fmean(r[key][n] for r in runs if n in r[key]) for n in seen}
                continue
            values = [r[key] for r in runs]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
            entry[key] = mean
            entry[f"{key}_std"] = std if len(values) > 1 else 0.0
        entry["per_seed"] = runs
        results[task] = entry
    png_path = None
    if png is not None and shown:
        png_path = str(write_examples(png, torch.stack(shown), rows=len(tasks)))
    data = {
        "train": f"{train} [train split]",
        "val": f"{val} [val split]",
        "num_support_pool": pool_n,
        "num_queries": query_n,
        "num_classes": num_classes,
        "ignore_index": ignore,
        "label_size": label_size,
    }
    settings = {
        "tasks": list(tasks),
        "shots": shots,
        "selection": selection,
        "seeds": list(seeds),
        "canvas": {"side": side, "cell": cell, "separator": 2 * sep, "layout": list(cv.QUADRANTS)},
        "readout": "answer cell de-normalised, averaged over shots, bilinear to the label size, nearest "
        "palette colour (L1; fg: mean intensity > 0.5)",
        "fg_class": "per query, a random class present in it (not 0, not ignored); supports hold it",
        "features": "mean of final-normed patch tokens, cosine (selection=nearest)",
    }
    return result(
        "prompt", "visual prompting by inpainting", describe_encoder(method.encoder), data, settings, results,
        examples_png=png_path, seconds=round(time.time() - start, 1),
    )  # fmt: skip


def _mean_by_class(values: list[float], classes: list[int], names: list[str]) -> dict[str, float]:
    """Percent mean of ``values`` per class id, keyed by class name, in class order."""
    by_class: dict[int, list[float]] = {}
    for v, c in zip(values, classes):
        by_class.setdefault(c, []).append(v)
    return {names[c]: 100 * sum(v) / len(v) for c, v in sorted(by_class.items())}


def write_examples(path: str | os.PathLike, canvases: torch.Tensor, rows: int) -> Path:
    """A PNG grid of painted canvases (N, 3, H, W) in [0, 1], ``rows`` rows; written atomically."""
    from PIL import Image

    path = Path(path)
    n, _, h, w = canvases.shape
    cols = math.ceil(n / rows)
    pad = 4
    grid = torch.ones(3, rows * (h + pad) - pad, cols * (w + pad) - pad)
    for i, img in enumerate(canvases):
        r, c = divmod(i, cols)
        grid[:, r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = img
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def compare_prompting(run_dir, train, val=None, png=None, **options) -> dict[str, Any]:
    """:func:`prompt_segmentation` of the run and of a random init of the same method, side by side."""
    trained = prompt_segmentation(run_dir, train, val, png=png, **options)
    floor = prompt_segmentation(run_dir, train, val, random_init=True, **options)
    out = dict(trained)
    out["random_init"] = {"encoder": floor["encoder"], "results": floor["results"]}
    print(format_prompting(out))
    return out


def format_prompting(res: dict[str, Any]) -> str:
    """The human table of a result (with its random init where present)."""
    columns = [("pretrained", res["results"])]
    if "random_init" in res:
        columns.append(("random init", res["random_init"]["results"]))
    rows = []
    for task, entry in res["results"].items():
        for key, value in entry.items():
            if key.endswith("_std") or key in ("per_seed", "episodes_by_class"):
                continue
            if isinstance(value, dict):  # one row per class
                for name in value:
                    rows.append([f"{task} {key}: {name}", *(c[1][task][key].get(name, "-") for c in columns)])
                continue
            rows.append([f"{task} {key}", *(c[1][task][key] for c in columns)])
    s = res["settings"]
    title = (
        f"visual prompting ({s['shots']}-shot, {s['selection']} supports, seeds {s['seeds']}) on "
        f"{res['data']['num_queries']} queries of {res['data']['val']}"
    )
    return format_table(["metric", *(c[0] for c in columns)], rows, title=title)
