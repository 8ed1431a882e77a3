"""``benchmark.py step``: one training step through mimkit's trainer path against a bare reference step.

The trainer path is what ``tools/pretrain.py`` runs per optimizer step: the method built from a
recipe (registry backbone, mask generator, recipe options) inside the DeepSpeed engine at world
size 1 with the recipe's AdamW parameter groups, fed a batch moved and cast as the trainer moves
it. The reference is :class:`~benchmarks.reference.ReferenceMAE` with MAE's weights, plain
AdamW. All paths share the process, the threads and one fixed batch of images (data loading is
``benchmark.py pipeline``'s business) and are timed in turns, round-robin, after warm-up steps, so
a change in machine load hits every path alike; the median step time counts.

Per path it reports images/s and the ratio to the reference, FLOPs per step counted by
``torch.utils.flop_counter`` for one forward and backward (split into the encoder, the decoder
side, i.e. every decoder and CAE's regressor, and the rest), the achieved FLOP/s and its share of
the measured matmul peak (:mod:`benchmarks.peak`, same shapes, the path's dtype), the peak
memory during its steps (resident set size on CPU, max allocated on GPU), and the time to draw
the batch's masks.

``--method finetune`` (alone) times fine-tuning instead: the ``finetune`` method from
``recipes/finetune/default.yaml`` (layer decay, Mixup/CutMix, drop path) in the same engine, fed
images and labels, against a plain timm fine-tuning step of the same model and weights
(:mod:`benchmarks.finetune_reference`).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import machine_info, print_table
from benchmarks.peak import mae_shapes, measure_peak, sync
from benchmarks.reference import ReferenceMAE, reference_optimizer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = RECIPES / "mae" / "default.yaml"
FINETUNE = (
    "finetune"  # benchmarked alone, against a plain timm fine-tuning step (benchmarks/finetune_reference.py)
)
FINETUNE_RECIPE = RECIPES / "finetune" / "default.yaml"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or Linux's resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # without it the peak is the process's lifetime peak
        Path("/proc/self/clear_refs").write_text("5")  # 5 resets VmHWM (Linux >= 4.0)


def peak_memory_mib(device: torch.device) -> float | None:
    """Max allocated GPU memory, or the process's peak resident set (VmHWM) on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _PartFlopCounter(FlopCounterMode):
    """A FLOP counter that also books every counted op to exactly one part of the model.

    ``FlopCounterMode`` credits an op to every module the tracker holds open, and at the
    encoder/decoder boundary of the backward pass both are open, so per-module sums overlap
    (and a decoder module can stay open through the encoder's backward, so "decoder first" would
    hand it the encoder's gradients). Here an op goes to the encoder if an encoder module is open,
    else to the decoder, else to ``other``: the parts add up to the total, and the boundary ops
    (the decoder embedding's input gradient, under 1% of a step) count as the encoder's. (It hooks
    the counter's ``_count_flops``, a private method of torch 2.x.) One known slip: the tracker
    never opens a module in backward whose inputs need no gradient, the patch embedding, so its
    weight gradient (0.12 of 36.8 GFLOPs per image for a ViT-S MAE) lands in the decoder.
    """

    def __init__(self, part_of):
        super().__init__(display=False, depth=None)
        self.part_of = part_of
        self.parts = {"encoder": 0, "decoder": 0, "other": 0}

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            open_parts = {self.part_of(p) for p in self.mod_tracker.parents}
            part = "encoder" if "encoder" in open_parts else "decoder" if "decoder" in open_parts else "other"
            self.parts[part] += flops
        return super()._count_flops(func_packet, out, args, kwargs)


def flop_split(module: nn.Module, run_step, is_encoder, is_decoder) -> dict[str, float]:
    """FLOPs of ``run_step()`` (one forward and backward of ``module``), by part of the model.

    Returns ``total``, ``encoder``, ``decoder`` and ``other`` (ops outside the named children:
    losses, targets, masking); a direct child of ``module`` belongs to the encoder or the decoder
    side by its name.
    """
    root = type(module).__name__

    def part_of(path: str) -> str | None:
        names = path.split(".")
        if len(names) < 2 or names[0] != root:
            return None
        return "encoder" if is_encoder(names[1]) else "decoder" if is_decoder(names[1]) else None

    counter = _PartFlopCounter(part_of)
    with counter:
        run_step()
    total = counter.get_total_flops()
    assert sum(counter.parts.values()) == total, (counter.parts, total)
    return {"total": total, **counter.parts}


def _method_part(name: str) -> str:
    return "decoder" if "decoder" in name or "regressor" in name else "other"


class TrainerPath:
    """One method as ``tools/pretrain.py`` trains it: recipe -> DeepSpeed engine -> step."""

    def __init__(self, recipe, dist, images: torch.Tensor, labels: torch.Tensor | None = None):
        from mimkit.train.trainer import INPUT_DTYPES, build_engine

        self.recipe = recipe
        self.name = f"mimkit {recipe.method.name}"
        self.engine, self.optimizer = build_engine(recipe, dist)
        self.dtype = INPUT_DTYPES[recipe.train.precision]
        self.images = images
        self.labels = labels  # fine-tuning's; it mixes the images in place, so each step gets a copy
        self.device = self.engine.device

    def batch(self) -> dict[str, torch.Tensor]:
        images = self.images.to(self.device, self.dtype, non_blocking=True)
        if self.labels is None:
            return {"image": images}
        return {"image": images.clone(), "label": self.labels}

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def step(self) -> float:
        """The trainer's per-step work: set the lr, move the batch, forward, backward, optimizer step."""
        from mimkit.train.trainer import set_lr

        set_lr(self.optimizer, self.recipe.lr)
        loss = self.engine(self.batch())["loss"]
        value = float(loss.detach().float())
        self.engine.backward(loss)
        self.engine.step()
        return value

    def flops(self) -> dict[str, float]:
        module = self.module

        def run_step():
            module(self.batch())["loss"].backward()

        split = flop_split(module, run_step, lambda n: n == "encoder", lambda n: _method_part(n) == "decoder")
        module.zero_grad(set_to_none=True)
        return split

    def mask_seconds(self) -> float | None:
        """Time to draw one batch of masks with the method's own generator (None if it has none)."""
        generator = getattr(self.module, "mask_generator", None)
        if generator is None:
            return None
        grid = self.module.encoder.grid_size
        tic = time.perf_counter()
        generator(len(self.images), grid, device=self.device)
        sync(self.device)
        return time.perf_counter() - tic


class ReferencePath:
    """The bare MAE step of the original code: fp32, or fp32 weights under fp16 autocast with a scaler."""

    def __init__(self, model: ReferenceMAE, images: torch.Tensor, precision: str):
        self.name = "reference MAE"
        self.model = model
        self.images = images
        self.device = images.device
        self.optimizer = reference_optimizer(model)
        self.autocast = precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type) if self.autocast else None

    @property
    def module(self) -> nn.Module:
        return self.model

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            loss = self.model(self.images)[0]
        value = float(loss.detach().float())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return value

    def flops(self) -> dict[str, float]:
        def run_step():
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
                loss = self.model(self.images)[0]
            loss.backward()

        split = flop_split(
            self.model,
            run_step,
            lambda n: n in ("patch_embed", "blocks", "norm"),
            lambda n: n.startswith("decoder_"),
        )
        self.model.zero_grad(set_to_none=True)
        return split

    def mask_seconds(self) -> None:
        return None  # the argsort masking is part of the forward pass


def build_recipe(method: str, args: argparse.Namespace, precision: str):
    """The recipe the trainer path runs: ``args.recipe`` with the method, backbone and batch of the benchmark.

    The recipe's ``method`` section is kept when it names the same method (so a demo recipe's
    small decoder is honoured) and replaced by ``{name: method}`` (the method's defaults)
    otherwise; ``--set`` overrides apply last.
    """
    from mimkit.train.config import apply_override, from_dict, read_yaml

    raw = read_yaml(args.recipe or (FINETUNE_RECIPE if method == FINETUNE else DEFAULT_RECIPE))
    section = raw.get("method") or {}
    if section.get("name") != method:
        section = {"name": method}
    backbone = dict(section.get("backbone") or {})
    if args.backbone:
        backbone["name"] = args.backbone
    if args.img_size:
        backbone["img_size"] = args.img_size
    section["backbone"] = backbone
    raw["method"] = section
    raw.setdefault("data", {})["img_size"] = None
    raw["batch"] = {"global_size": args.batch, "micro_size": args.batch}
    train = raw.setdefault("train", {})
    train.update(precision=precision, compile=bool(args.compile), max_steps=None)
    if args.zero_stage is not None:
        train["zero_stage"] = args.zero_stage
    raw.setdefault("run", {}).update(dir="runs/benchmark-step", progress=False)  # never written
    for item in args.set:
        apply_override(raw, item)
    return from_dict(raw, world_size=1, check_data=False)


def _reference_for(paths: list[TrainerPath], fused_attn: bool) -> ReferenceMAE:
    """The reference with the MAE path's weights, or with a fresh MAE's on the first path's backbone."""
    from mimkit.ssl import build_method
    from mimkit.ssl.mae import MAE

    for path in paths:
        if isinstance(path.module, MAE):
            mae = path.module
            break
    else:
        section = paths[0].recipe.method.to_dict()
        mae = build_method({"name": "mae", "backbone": section["backbone"]})
    return ReferenceMAE.from_mae(mae, fused_attn=fused_attn).to(paths[0].device).float()


def _row(path, seconds: list[float], flops: dict, peak: dict, dtype: str, memory, mask_s, batch) -> dict:
    median = statistics.median(seconds)
    achieved = flops["total"] / median / 1e9
    return {
        "path": path.name,
        "dtype": dtype,
        "images_per_s": round(batch / median, 2),
        "step_seconds": round(median, 4),
        "step_seconds_all": [round(s, 4) for s in seconds],
        "gflops_per_step": round(flops["total"] / 1e9, 2),
        "gflops_per_image": round(flops["total"] / 1e9 / batch, 3),
        "encoder_gflops": round(flops["encoder"] / 1e9, 2),
        "decoder_gflops": round(flops["decoder"] / 1e9, 2),
        "other_gflops": round(flops["other"] / 1e9, 2),
        "decoder_share": round(flops["decoder"] / max(flops["total"], 1), 4),
        "achieved_gflop_per_s": round(achieved, 2),
        "peak_gflop_per_s": peak.get(dtype),
        "utilisation": round(achieved / peak[dtype], 4) if peak.get(dtype) else None,
        "peak_memory_mib": round(memory, 1) if memory is not None else None,
        "mask_ms": round(mask_s * 1e3, 3) if mask_s is not None else None,
    }


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method", nargs="+", default=["mae"], help="registered methods, each a trainer path (mae)"
    )
    parser.add_argument(
        "--backbone", default="vit_small_patch16", help="registered backbone (vit_small_patch16)"
    )
    parser.add_argument("--img-size", type=int, default=224, help="image side (224)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (32)")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISIONS, help="auto: fp32 on CPU, bf16 on GPU"
    )
    parser.add_argument(
        "--reference-precision",
        default="auto",
        choices=("auto", "fp32", "fp16"),
        help="auto: fp32 on CPU, fp16 autocast on GPU (as the original code ran)",
    )
    parser.add_argument(
        "--reference-attention",
        default="timm",
        choices=("timm", "naive"),
        help="timm: plain timm blocks as timm runs them (fused SDPA; default); naive: softmax(q k^T) v, "
        "as the original code's timm 0.3 blocks computed it",
    )
    parser.add_argument("--no-reference", action="store_true", help="time the trainer paths only")
    parser.add_argument(
        "--recipe",
        default=None,
        help="optimiser/param-group source recipe (recipes/mae/default.yaml; for finetune "
        "recipes/finetune/default.yaml)",
    )
    parser.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage (default: the recipe's)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the trainer paths (train.compile)"
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides, e.g. method.decoder_dim=128",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per path first (2)")
    parser.add_argument("--peak-gflops", type=float, default=None, help="skip the peak measurement, use this")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from mimkit.ssl import list_methods
    from mimkit.train.distributed import init_distributed

    unknown = [m for m in args.method if m not in list_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(list_methods())}")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    dist = init_distributed()
    device = dist.device
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    ref_precision = args.reference_precision
    if ref_precision == "auto":
        ref_precision = "fp16" if device.type == "cuda" else "fp32"

    if FINETUNE in args.method and len(args.method) > 1:
        raise ValueError("--method finetune is benchmarked alone (its reference is a timm fine-tuning step)")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    paths: list[Any] = []
    for m in args.method:
        recipe = build_recipe(m, args, precision)
        labels = None
        if m == FINETUNE:
            classes = recipe.method.options.get("num_classes", 1000)
            labels = torch.randint(0, classes, (args.batch,), generator=g).to(device)
        paths.append(TrainerPath(recipe, dist, images, labels))
    dtypes = {p.name: precision for p in paths}
    if not args.no_reference and args.method == [FINETUNE]:
        from benchmarks.finetune_reference import TimmFinetunePath

        r = paths[0].recipe
        reference = TimmFinetunePath.from_finetune(
            paths[0].module, images, labels, r.lr, r.optim.layer_decay, ref_precision
        )
        paths.insert(0, reference)
        dtypes[paths[0].name] = ref_precision
    elif not args.no_reference:
        reference = _reference_for(paths, fused_attn=args.reference_attention == "timm")
        paths.insert(0, ReferencePath(reference, images, ref_precision))
        dtypes[paths[0].name] = ref_precision

    flops = {p.name: p.flops() for p in paths}
    if args.peak_gflops:
        peak = {d: args.peak_gflops for d in set(dtypes.values())}
    else:
        encoder = paths[-1].module.encoder
        decoder_dim = getattr(getattr(paths[-1].module, "decoder", None), "embed", None)
        shapes = mae_shapes(
            encoder.embed_dim,
            decoder_dim.out_features if decoder_dim is not None else 512,
            args.batch,
            encoder.num_patches,
        )
        peak = measure_peak(shapes, sorted(set(dtypes.values())), device)[1]

    seconds: dict[str, list[float]] = {p.name: [] for p in paths}
    memory: dict[str, float | None] = {}
    losses: dict[str, list[float]] = {p.name: [] for p in paths}
    total = (args.warmup + args.steps) * len(paths)
    with tqdm(total=total, desc="benchmark step", unit="step", disable=args.no_progress) as bar:
        for round_ in range(args.warmup + args.steps):
            timed = round_ >= args.warmup
            order = paths[round_ % len(paths) :] + paths[: round_ % len(paths)]  # no path always first
            for path in order:
                reset_peak_memory(device)
                sync(device)
                tic = time.perf_counter()
                losses[path.name].append(path.step())
                sync(device)
                if timed:
                    seconds[path.name].append(time.perf_counter() - tic)
                    peak_now = peak_memory_mib(device)
                    if peak_now is not None:
                        memory[path.name] = max(memory.get(path.name) or 0.0, peak_now)
                bar.update(1)

    rows = []
    reference_speed = None
    for path in paths:
        draws = [path.mask_seconds() for _ in range(3)]
        mask_s = statistics.median(draws) if draws[0] is not None else None
        name = path.name
        row = _row(path, seconds[name], flops[name], peak, dtypes[name], memory.get(name), mask_s, args.batch)
        row["loss_first"], row["loss_last"] = round(losses[path.name][0], 5), round(losses[path.name][-1], 5)
        if not isinstance(path, TrainerPath):  # the reference
            reference_speed = row["images_per_s"]
        rows.append(row)
    for row in rows:
        row["ratio_to_reference"] = (
            round(row["images_per_s"] / reference_speed, 4) if reference_speed else None
        )
    print_table(
        rows,
        [
            "path",
            "dtype",
            "images_per_s",
            "ratio_to_reference",
            "gflops_per_image",
            "decoder_share",
            "achieved_gflop_per_s",
            "utilisation",
            "peak_memory_mib",
            "mask_ms",
        ],
    )
    options = {
        k: getattr(args, k)
        for k in (
            "method",
            "backbone",
            "img_size",
            "batch",
            "reference_attention",
            "recipe",
            "zero_stage",
            "compile",
            "set",
            "steps",
            "warmup",
        )
    }
    options.update(precision=precision, reference_precision=ref_precision)
    options["recipe"] = args.recipe or str(FINETUNE_RECIPE if args.method == [FINETUNE] else DEFAULT_RECIPE)
    return {
        "benchmark": "step",
        "device": str(device),
        "options": options,
        "machine": machine_info(),
        "peak_gflop_per_s": peak,
        "results": rows,
    }
