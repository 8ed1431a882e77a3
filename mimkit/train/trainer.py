"""The training loop on DeepSpeed, method-agnostic: it calls ``method(batch)["loss"]``.

:func:`pretrain` takes a validated :class:`~mimkit.train.config.Recipe` and owns a run directory::

    RUN/recipe.yaml              the resolved recipe (defaults and overrides applied)
    RUN/metrics.jsonl            one JSON line per logged step (and per evaluation), appended and flushed
    RUN/metrics.csv, tensorboard/, wandb/   the same records, where run.loggers asks (mimkit.train.loggers)
    RUN/images/                  reconstructions during training (run.images_every, mimkit.train.monitor)
    RUN/checkpoints/             DeepSpeed checkpoints and ``latest`` (see mimkit.train.checkpoint)
    RUN/model.safetensors        the whole method, fp32, consolidated over ZeRO shards
    RUN/encoder.safetensors      the backbone alone, with encoder.json (mimkit.models.load_backbone)
    RUN/best/                    the same exports of the best checkpoint (with eval.best_metric)
    RUN/ema/                     the same exports of the weight average (with train.ema_decay)

Starting a run whose directory holds a complete checkpoint resumes it: weights, optimizer,
step (hence the learning rate), every random state and the position in the epoch, so the
resumed run continues exactly as the uninterrupted one would have.

Pretraining and fine-tuning share it. What a method may add is asked of the method, never of its
name: ``evaluate`` (run on ``eval.split``, see :mod:`mimkit.train.evaluation`), ``group_matcher``
(layer-wise lr decay; each optimizer group's lr is the schedule's times its ``lr_scale``) and
``save_exports`` (files beside the encoder export). ``train.init_from`` loads an encoder before
the first step (:mod:`mimkit.train.init_from`).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import IterableDataset
from tqdm import tqdm

from mimkit.files import atomic_write, atomic_write_text
from mimkit.train import checkpoint
from mimkit.train.config import Recipe, RecipeError, from_dict, load_recipe
from mimkit.train.cpu_memory import keep_freed_memory
from mimkit.train.distributed import Dist, barrier, import_deepspeed, init_distributed
from mimkit.train.evaluation import Best, Evaluator
from mimkit.train.init_from import load_init
from mimkit.train.loader import build_loader, build_stream_loader
from mimkit.train.loggers import IMAGE_TAG, IMAGES_DIR, METRICS_FILE, RunLoggers
from mimkit.train.monitor import KnnMonitor, Reconstructions
from mimkit.train.optim import build_adamw
from mimkit.train.schedule import warmup_cosine_lr

RECIPE_FILE = "recipe.yaml"
MODEL_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"
BEST_DIR = "best"
EMA_DIR = "ema"
INPUT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class BadDataError(RuntimeError):
    """The share of skipped bad samples passed ``data.max_bad_fraction``."""


@dataclass
class RunResult:
    """What a finished :func:`pretrain` call did.

    ``module`` is the trained method as this rank holds it (under ZeRO-3 its parameters are
    partitioned; ``load_method(run_dir)`` gives the whole model anywhere).
    """

    module: nn.Module
    run_dir: Path
    steps: int
    resumed_from: int
    first_loss: float | None
    final_loss: float | None
    wall_time: float
    encoder_path: Path
    model_path: Path
    checkpoint: Path
    best: dict[str, Any] | None = None  # eval.best_metric's best value, step and export directory
    evaluation: dict[str, float] | None = None  # the last evaluation of this call (eval.split)
    monitor: dict[str, float] | None = None  # the last k-NN monitor values (run.monitor)
    watch_seconds: float = 0.0  # spent on the k-NN monitor and reconstruction pictures in this call


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed configuration a recipe asks for."""
    precision = recipe.train.precision
    return {
        "train_batch_size": recipe.batch.global_size,
        "train_micro_batch_size_per_gpu": recipe.batch.micro_size,
        "gradient_accumulation_steps": recipe.accumulation,
        "gradient_clipping": recipe.optim.clip_grad or 0.0,
        "zero_optimization": {"stage": recipe.train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": sys.maxsize,  # progress is ours
        "wall_clock_breakdown": False,
    }


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale`` (layer-wise decay; 1 where a group has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # and every CUDA device


def pretrain(recipe: Recipe, task: str = "pretrain") -> RunResult:
    """Train (or resume) the run ``recipe`` describes; every rank of the job calls this.

    ``task`` only names the run in the progress bar and the summary (``finetune`` for fine-tuning).
    """
    start_time = time.time()
    dist = init_distributed()
    if dist.world_size != recipe.world_size:  # launched differently from how it was validated
        recipe = from_dict(recipe.to_dict(), world_size=dist.world_size)
    if dist.device.type == "cpu" and recipe.train.precision == "fp16":
        raise RecipeError("train.precision=fp16 needs GPUs (DeepSpeed on CPU runs fp32 or bf16)")
    run_dir = Path(recipe.run.dir)
    ckpt_dir = run_dir / CHECKPOINTS
    recipe = resolve_auto_stats(recipe, verbose=dist.is_main)
    loader, sampler = _data(recipe, dist)
    if dist.is_main:
        _warn_if_oversubscribed(recipe.data.workers, dist.device)
        _warn_if_greyscale_as_rgb(recipe)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = recipe.train.epochs * steps_per_epoch
    last_step = min(total_steps, recipe.train.max_steps or total_steps)
    evaluator = Evaluator(recipe, dist) if recipe.eval.split else None
    monitor = KnnMonitor(recipe) if recipe.run.monitor else None
    pictures = Reconstructions(recipe, run_dir) if recipe.run.images_every else None
    resuming = checkpoint.latest_tag(ckpt_dir) is not None  # then the checkpoint holds the weights
    engine, optimizer = build_engine(recipe, dist, init_from=None if resuming else recipe.train.init_from)
    o = recipe.optim

    state = checkpoint.load(engine, ckpt_dir, dist.rank)
    step = state["step"] if state else 0
    last_tag = state["tag"] if state else None
    best = _best_tracker(recipe, engine.module, state)
    ema = _build_ema(recipe, engine.module, state)
    last_scores = None
    if dist.is_main:
        _prepare_run_dir(recipe, run_dir, step if state else None)
    barrier()

    log = RunLoggers(run_dir, recipe.run.loggers, recipe.to_dict(), step if state else None, dist.is_main)
    bar = tqdm(
        total=last_step,
        initial=step,
        desc=f"{task} {run_dir.name}",
        unit="step",
        dynamic_ncols=True,
        disable=not (dist.is_main and recipe.run.progress),
    )
    plain_fp32 = recipe.train.zero_stage == 0 and recipe.train.precision == "fp32"
    input_dtype = INPUT_DTYPES[recipe.train.precision]
    accum = recipe.accumulation
    first_loss = final_loss = None
    window = _Window()
    resumed_from = step
    last_monitor = None
    if pictures is not None:  # before training: a method that paints no pixels fails here
        _draw(pictures, engine.module, engine.device, input_dtype, step, log, dist, write=not state)
    if monitor is not None and not state:  # the random init's value starts the curve
        last_monitor = _watch(
            monitor, engine.module.encoder, engine.device, input_dtype, step, steps_per_epoch
        )
        log.scalars(_with_time(last_monitor, start_time))
        if dist.is_main:
            bar.write(_monitor_line(last_monitor))

    epoch, in_epoch = divmod(step, steps_per_epoch)
    while step < last_step:
        sampler.set_epoch(epoch, in_epoch)
        # epoch-scheduled parts of a method (e.g. ColorMAE's colour schedule) follow the epoch,
        # which is restored on resume, so they need no state of their own
        engine.module.set_epoch(epoch)
        for micro, batch in enumerate(loader):
            if micro % accum == 0:
                lr = warmup_cosine_lr(
                    step, steps_per_epoch, recipe.lr, recipe.train.epochs, o.warmup_epochs, o.min_lr
                )
                set_lr(optimizer, lr)
            batch = {
                k: v.to(engine.device, input_dtype if v.is_floating_point() else None, non_blocking=True)
                for k, v in batch.items()
            }
            out = engine(batch)
            loss = out["loss"]
            if recipe.debug.nan_at_step == step + 1:
                loss = loss * float("nan")
            value = _mean_over_ranks(loss.detach().float(), dist)
            if not math.isfinite(value):
                bar.close()
                where = f"{ckpt_dir / last_tag}" if last_tag else "none (no checkpoint was saved yet)"
                raise NonFiniteLossError(
                    f"loss is {value} at step {step + 1} (epoch {epoch}); stopping. Last good checkpoint: "
                    f"{where}. Re-running the same command resumes from it."
                )
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            logging_step = (step + 1) % recipe.run.log_every == 0 or step + 1 == last_step
            grad_norm = _grad_norm(engine) if boundary and logging_step and plain_fp32 else None
            engine.step()
            window.add(value, out)
            if not boundary:
                continue

            step += 1
            if ema is not None:
                ema.update(engine.module, step)
            if first_loss is None:
                first_loss = window.loss_sum / window.count
            bar.update(1)
            bar.set_postfix(
                loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{window.speed(recipe):.0f}", refresh=False
            )
            if logging_step:
                if grad_norm is None and engine.get_global_grad_norm() is not None:
                    grad_norm = float(engine.get_global_grad_norm())
                final_loss = window.loss_sum / window.count
                log.scalars(
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "loss": final_loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "images_per_s": round(window.speed(recipe), 2),
                        "skipped_steps": engine.skipped_steps,  # fp16 overflow steps, whole run
                        **_data_counts(sampler, dist, recipe.data.max_bad_fraction, step),
                        **window.extras(),
                        **_device_memory(engine.device),
                        "time": round(time.time() - start_time, 2),
                    }
                )
                window = _Window()
            improved = False
            if evaluator is not None and _eval_due(
                step, steps_per_epoch, last_step, recipe.eval.every_epochs
            ):
                last_scores = evaluator(engine.module, engine.device, input_dtype)
                if ema is not None:  # fp32 weights, fp32 inputs
                    ema_scores = evaluator(ema.module, engine.device, torch.float32)
                    last_scores.update({f"ema_{k}": v for k, v in ema_scores.items()})
                improved = best is not None and best.update(last_scores, step)
                log.scalars(_eval_record(last_scores, evaluator.split, step, steps_per_epoch, start_time))
                if dist.is_main:
                    bar.write(_eval_line(last_scores, evaluator.split, step, steps_per_epoch, improved))
            if monitor is not None and monitor.due(step, last_step):
                last_monitor = _watch(
                    monitor, engine.module.encoder, engine.device, input_dtype, step, steps_per_epoch
                )
                log.scalars(_with_time(last_monitor, start_time))
                if dist.is_main:
                    bar.write(_monitor_line(last_monitor))
            if pictures is not None and pictures.due(step, last_step):
                _draw(pictures, engine.module, engine.device, input_dtype, step, log, dist, write=True)
            every = recipe.run.checkpoint_every
            if step == last_step or (every and step % every == 0) or improved:
                last_tag = _save(engine, ckpt_dir, step, steps_per_epoch, recipe, dist, best, ema)
            if recipe.debug.kill_after_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            if step >= last_step:
                break
        epoch, in_epoch = epoch + 1, 0
    bar.close()
    log.close()

    if last_tag != checkpoint.tag_for(step):  # resumed a run that had already finished
        last_tag = _save(engine, ckpt_dir, step, steps_per_epoch, recipe, dist, best, ema)
    best_dir = _export_best(engine, recipe, ckpt_dir, best, last_tag, run_dir, dist)
    _export(engine, recipe, ckpt_dir, last_tag, run_dir, dist.rank, step)
    if ema is not None and dist.is_main:
        _write_exports(_cpu_state(ema.module), recipe, run_dir / EMA_DIR, step)
    barrier()
    result = RunResult(
        module=engine.module,
        run_dir=run_dir,
        steps=step,
        resumed_from=resumed_from,
        first_loss=first_loss,
        final_loss=final_loss,
        wall_time=time.time() - start_time,
        encoder_path=run_dir / "encoder.safetensors",
        model_path=run_dir / MODEL_FILE,
        checkpoint=ckpt_dir / last_tag,
        best={**best.state(), "dir": best_dir} if best is not None and best_dir is not None else None,
        evaluation=last_scores,
        monitor=last_monitor,
        watch_seconds=(monitor.seconds if monitor else 0.0) + (pictures.seconds if pictures else 0.0),
    )
    if dist.is_main:
        print(summary(result, recipe, total_steps, task), flush=True)
    return result


def _watch(monitor: KnnMonitor, encoder: nn.Module, device, dtype, step: int, steps_per_epoch: int) -> dict:
    """A k-NN monitor record at ``step``."""
    return {"step": step, "epoch": round(step / steps_per_epoch, 4), **monitor(encoder, device, dtype)}


def _with_time(record: dict, start: float) -> dict:
    return {**record, "time": round(time.time() - start, 2)}


def _monitor_line(record: dict) -> str:
    return (
        f"[mimkit] step {record['step']} monitor: k-NN top-1 cls {record['monitor_knn_cls']:.1f}, "
        f"patch mean {record['monitor_knn_patch_mean']:.1f} ({record['monitor_seconds']:.1f} s)"
    )


def _draw(
    pictures: Reconstructions, module, device, dtype, step: int, log: RunLoggers, dist: Dist, write: bool
):
    """Reconstructions at ``step``: every rank runs the forward pass, rank 0 writes and logs them."""
    grid = pictures(module, device, dtype, step, write=write and dist.is_main)
    if write:
        log.image(IMAGE_TAG, grid, step)


def _device_memory(device: torch.device) -> dict[str, float]:
    """The peak memory of the accelerator so far (GiB); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}


def _best_tracker(recipe: Recipe, module: nn.Module, state: dict | None) -> Best | None:
    """The best-checkpoint tracker ``eval.best_metric`` asks for, restored from the checkpoint."""
    metric = recipe.eval.best_metric
    if metric is None:
        return None
    mode = type(module).eval_metrics[metric]
    return Best.from_state(metric, mode, (state or {}).get("best"))


def _build_ema(recipe: Recipe, module: nn.Module, state: dict | None):
    """``train.ema_decay``: timm's ``ModelEmaV3`` of the module in fp32, restored from the checkpoint.

    Built after the checkpoint is loaded, so a run that turns the average on when resuming starts it
    from the resumed weights. Every rank keeps the same average (ZeRO stages 0-2 hold every weight).
    """
    if recipe.train.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(module, decay=recipe.train.ema_decay, dtype=torch.float32)
    ema.module.requires_grad_(False)
    saved = (state or {}).get("ema")
    if saved is not None:
        ema.module.load_state_dict(saved, strict=True)
    return ema


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in module.state_dict().items()
    }


def _eval_due(step: int, steps_per_epoch: int, last_step: int, every_epochs: int) -> bool:
    """At the end of every ``every_epochs``-th epoch, and of the run."""
    epoch_end = step % steps_per_epoch == 0 and (step // steps_per_epoch) % every_epochs == 0
    return epoch_end or step == last_step


def _eval_record(scores: dict, split: str, step: int, steps_per_epoch: int, start: float) -> dict:
    named = {f"{split}_{k}": v for k, v in scores.items()}
    return {
        "step": step,
        "epoch": round(step / steps_per_epoch, 4),
        **named,
        "time": round(time.time() - start, 2),
    }


def _eval_line(scores: dict, split: str, step: int, steps_per_epoch: int, improved: bool) -> str:
    values = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
    mark = " (best so far)" if improved else ""
    return f"[mimkit] step {step} (epoch {step / steps_per_epoch:g}) {split}: {values}{mark}"


def _export_best(
    engine, recipe: Recipe, ckpt_dir: Path, best: Best | None, last_tag: str, run_dir: Path, dist: Dist
) -> Path | None:
    """Export the best checkpoint to ``RUN/best`` (the same files as the run's); returns it, or None.

    The best step's checkpoint is kept through pruning (see :func:`_save`); it is read back into the
    engine (without its random state), exported, and the last checkpoint read back again, so the
    engine ends as the run did. Exporting only here, from complete checkpoints, keeps ``best/``
    whole whatever killed an earlier attempt.
    """
    if best is None or best.step is None:
        return None
    tag = checkpoint.tag_for(best.step)
    if not (ckpt_dir / tag).is_dir():
        if dist.is_main:
            print(f"[mimkit] the best checkpoint {ckpt_dir / tag} is gone; no best/ export", file=sys.stderr)
        return None
    if tag != last_tag:
        checkpoint.load(engine, ckpt_dir, dist.rank, tag=tag, restore_rng=False)
    _export(engine, recipe, ckpt_dir, tag, run_dir / BEST_DIR, dist.rank, best.step)
    if tag != last_tag:
        checkpoint.load(engine, ckpt_dir, dist.rank, tag=last_tag, restore_rng=False)
    return run_dir / BEST_DIR


def resolve_auto_stats(recipe: Recipe, verbose: bool = False) -> Recipe:
    """The recipe with ``data.mean`` / ``data.std: auto`` replaced by the source's measured values.

    Every rank measures the same fixed sample (:func:`mimkit.data.stats.channel_stats`), so all
    agree without communicating; the values land in the run's ``recipe.yaml`` and the encoder export.
    """
    d = recipe.data
    if "auto" not in (d.mean, d.std):
        return recipe
    from mimkit.data.stats import STATS_IMAGES, channel_stats

    measured = channel_stats(d.source, d.split, recipe.channels, STATS_IMAGES)
    raw = recipe.to_dict()
    for key in ("mean", "std"):
        if getattr(d, key) == "auto":
            raw["data"][key] = list(getattr(measured, key))
    if verbose:
        print(
            f"[mimkit] data.mean/std: auto -> mean {raw['data']['mean']}, std {raw['data']['std']} "
            f"(from {STATS_IMAGES} images of {d.source}, {recipe.channels} channel(s))",
            file=sys.stderr,
        )
    return from_dict(raw, world_size=recipe.world_size)


def train_transform(recipe: Recipe):
    """The transform the trainer applies to every training sample of ``recipe``."""
    from mimkit.data import build_transform
    from mimkit.finetune.transforms import FINETUNE_TRANSFORM, finetune_transform

    d = recipe.data
    if d.transform == FINETUNE_TRANSFORM:
        return finetune_transform(
            recipe.img_size, recipe.normalization, d.crop_scale, d.auto_augment, d.random_erase
        )
    return build_transform(d.transform, recipe.img_size, recipe.normalization, d.crop_scale)


def _warn_if_greyscale_as_rgb(recipe: Recipe) -> None:
    """A greyscale folder read as three replicated channels trains a worse encoder: say so, name the key."""
    if recipe.channels != 3 or not recipe.data.source.startswith("folder:"):
        return
    from mimkit.data.stats import GREY_CHECK_IMAGES, looks_greyscale

    if looks_greyscale(recipe.data.source, recipe.data.split, GREY_CHECK_IMAGES):
        print(
            f"[mimkit] every one of {GREY_CHECK_IMAGES} sampled images of {recipe.data.source} is greyscale, "
            "but data.channels is 3 (three replicated channels, an easier task and a worse encoder); "
            "set data.channels=1, and data.mean=auto data.std=auto for the data's own statistics",
            file=sys.stderr,
        )


def _data(recipe: Recipe, dist: Dist):
    """The training loader and its resumable sampler; a source smaller than one batch is an error."""
    from mimkit.data import build_source

    d = recipe.data
    dataset = build_source(d.source, d.split, train_transform(recipe))
    if len(dataset) < recipe.batch.global_size:
        raise RecipeError(
            f"data.source {d.source!r} ({d.split}) holds {len(dataset)} images, fewer than one global "
            f"batch (batch.global_size={recipe.batch.global_size})"
        )
    build = build_stream_loader if isinstance(dataset, IterableDataset) else build_loader
    return build(
        dataset,
        recipe.batch.micro_size,
        recipe.batch.global_size,
        dist.rank,
        dist.world_size,
        recipe.run.seed,
        d.workers,
        pin_memory=dist.device.type == "cuda",
    )


def _warn_if_oversubscribed(workers: int, device: torch.device) -> None:
    """Loader processes plus compute threads beyond the cores starve both: say so and name the fix.

    Measured on 2 cores: the demo at 2 workers next to 2 compute threads ran at 11 images/s,
    against 127 at 0 workers (benchmarks/README.md, pipeline).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 0 and workers + threads > cores:
        print(
            f"[mimkit] data.workers={workers} loader processes next to {threads} compute threads on "
            f"{cores} cores oversubscribe the CPU and can slow training several-fold; use data.workers=0 "
            f"or OMP_NUM_THREADS={max(1, cores - workers)}",
            file=sys.stderr,
        )


def _data_counts(sampler, dist: Dist, max_bad_fraction: float, step: int) -> dict[str, int]:
    """Samples read and skipped as bad over all ranks, where the source counts them; too many stop the run."""
    counts = sampler.counts() if hasattr(sampler, "counts") else None
    if counts is None:
        return {}
    counts = torch.tensor(counts, dtype=torch.float64)
    if dist.world_size > 1:
        torch.distributed.all_reduce(counts)
    good, bad = (int(c) for c in counts.tolist())
    if _too_many_bad(good, bad, max_bad_fraction):
        read = good + bad
        raise BadDataError(
            f"{bad} of {read} samples read by step {step} were bad and skipped (undecodable or truncated "
            f"images, truncated or missing shards): {bad / read:.2%} > data.max_bad_fraction="
            f"{max_bad_fraction}. The BadSampleWarning lines above name each file; repair or remove "
            "those files (shards: rewrite them with tools/make_shards.py), or raise data.max_bad_fraction"
        )
    return {"samples_read": good, "bad_samples": bad}


def _too_many_bad(good: int, bad: int, max_bad_fraction: float) -> bool:
    """Whether the bad share passes ``max_bad_fraction``, judged once enough samples were read.

    Before ``1 / max_bad_fraction`` samples, one bad sample alone is past the share, so judging then
    would stop a run for a single damaged file met in its first batches, whatever the data.
    """
    read = good + bad
    if max_bad_fraction > 0 and read < 1 / max_bad_fraction:
        return False
    return bad > max_bad_fraction * read


def build_engine(recipe: Recipe, dist: Dist, init_from: str | None = None):
    """The method, built from the same seed on every rank, wrapped in a DeepSpeed engine with AdamW.

    Returns ``(engine, optimizer)``. ``init_from`` (``train.init_from`` on a fresh run) loads an
    encoder into ``method.encoder`` first (:func:`mimkit.train.init_from.load_init`; rank 0 prints
    what it loaded); a file that does not fit is a :class:`RecipeError`. With ``train.compile`` the
    engine's module goes through ``torch.compile`` (DeepSpeed's ``engine.compile``; state-dict keys
    stay unchanged).
    """
    from mimkit.ssl import build_method

    deepspeed = import_deepspeed()
    if dist.device.type == "cpu":
        keep_freed_memory()  # 13-20% faster CPU steps (mimkit/train/cpu_memory.py)
    seed_everything(recipe.run.seed)  # identical initial weights on every rank
    method = build_method(recipe.method.to_dict())
    if init_from is not None:
        _init_encoder(method, init_from, recipe, dist.is_main)
    method.set_grad_checkpointing(recipe.train.grad_checkpointing)
    o = recipe.optim
    optimizer = build_adamw(
        method, recipe.lr, o.betas, o.eps, o.weight_decay, o.no_decay, dist.device, o.layer_decay
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=method, optimizer=optimizer, config=deepspeed_config(recipe)
    )
    if dist.world_size == 1 and recipe.train.zero_stage == 0:
        # Alone, DeepSpeed still flattens every gradient into a buffer, all-reduces it with itself
        # and copies it back after each backward: pure copies, so skip them.
        engine.enable_backward_allreduce = False
    if recipe.train.compile:
        engine.compile()
    seed_everything(recipe.run.seed + dist.rank)  # per-rank streams for masks and dropout
    return engine, optimizer


def _init_encoder(method: nn.Module, path: str, recipe: Recipe, verbose: bool) -> None:
    """``train.init_from``: load ``path`` into ``method.encoder``; what does not fit is a RecipeError."""
    try:
        report = load_init(method.encoder, path)
    except (ValueError, OSError) as err:
        raise RecipeError(str(err)) from None
    if not verbose:
        return
    print(report.describe(), file=sys.stderr)
    recorded = report.normalization
    if recorded is not None and recorded != recipe.normalization.to_dict():
        print(
            f"[mimkit] the encoder in train.init_from was trained on inputs normalised with {recorded}, "
            f"the recipe normalises with {recipe.normalization.to_dict()}; set data.mean and data.std "
            "to the former unless the change is meant",
            file=sys.stderr,
        )


def _save(
    engine,
    ckpt_dir: Path,
    step: int,
    steps_per_epoch: int,
    recipe: Recipe,
    dist: Dist,
    best: Best | None = None,
    ema=None,
) -> str:
    """Save step ``step``; the best checkpoint (``eval.best_metric``) is kept through pruning.

    The weight average (``train.ema_decay``) rides in DeepSpeed's client state, so it is part of
    the same checkpoint and published with it.
    """
    client_state = {
        "step": step,
        "epoch": step // steps_per_epoch,
        "step_in_epoch": step % steps_per_epoch,
        "world_size": dist.world_size,
    }
    if ema is not None:
        client_state["ema"] = _cpu_state(ema.module)
    protect = ()
    if best is not None:
        client_state["best"] = best.state()
        if best.step is not None:
            protect = (checkpoint.tag_for(best.step),)
    return checkpoint.save(
        engine,
        ckpt_dir,
        step,
        client_state,
        dist.rank,
        recipe.run.keep_checkpoints,
        fail_midway=recipe.debug.kill_in_save_at_step == step,
        protect=protect,
    )


def _mean_over_ranks(value: torch.Tensor, dist: Dist) -> float:
    """The loss averaged over ranks; a NaN on any rank makes it NaN everywhere, so all ranks stop."""
    if dist.world_size > 1:
        torch.distributed.all_reduce(value)
        value = value / dist.world_size
    return float(value)


def _grad_norm(engine) -> float:
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


class _Window:
    """Running sums over the steps since the last log line."""

    def __init__(self):
        self.loss_sum, self.count, self.start = 0.0, 0, time.perf_counter()
        self.steps = 0
        self.scalars: dict[str, torch.Tensor] = {}

    def add(self, loss: float, out: dict[str, Any]) -> None:
        self.loss_sum += loss
        self.count += 1
        for key, value in out.items():
            if key != "loss" and isinstance(value, torch.Tensor) and value.ndim == 0:
                self.scalars[key] = self.scalars.get(key, 0.0) + value.detach().float()

    def speed(self, recipe: Recipe) -> float:
        micro_per_step = recipe.accumulation
        steps = self.count / micro_per_step
        return steps * recipe.batch.global_size / max(time.perf_counter() - self.start, 1e-9)

    def extras(self) -> dict[str, float]:
        return {k: float(v) / self.count for k, v in self.scalars.items()}


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resumed_step: int | None) -> None:
    """Write ``recipe.yaml``; on resume, warn about changed keys and drop metrics and pictures past the
    checkpoint (all of them on a fresh start)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = run_dir / RECIPE_FILE
    if resumed_step is not None and recipe_path.is_file():
        try:
            before = _flatten(load_recipe(recipe_path, check_data=False).to_dict())
        except RecipeError as err:
            before = {"(unreadable previous recipe.yaml)": str(err)}
        after = _flatten(recipe.to_dict())
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            print(f"[mimkit] resuming with changed recipe keys: {', '.join(changed)}", file=sys.stderr)
    atomic_write_text(recipe_path, recipe.dump())

    for picture in (run_dir / IMAGES_DIR).glob("step*.png"):  # drawn again from the checkpoint on
        if resumed_step is None or int(picture.stem.removeprefix("step")) > resumed_step:
            picture.unlink()
    metrics = run_dir / METRICS_FILE
    if resumed_step is None:
        metrics.unlink(missing_ok=True)
    elif metrics.is_file():  # steps after the checkpoint will be logged again
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resumed_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError):
                pass  # a line cut short by a crash
        metrics.write_text("".join(kept))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _export(engine, recipe: Recipe, ckpt_dir: Path, tag: str, directory: Path, rank: int, step: int) -> None:
    """Write ``model.safetensors`` (whole method, fp32) and the encoder export (rank 0 writes).

    A method with ``save_exports(directory, provenance)`` adds its own files (fine-tuning: the
    classifier as timm loads it).
    """
    state = checkpoint.consolidated_state_dict(engine, ckpt_dir, tag, rank)
    if rank == 0:
        _write_exports(state, recipe, directory, step)


def _write_exports(state: dict[str, torch.Tensor], recipe: Recipe, directory: Path, step: int) -> None:
    """The files of :func:`_export` from a whole fp32 state dict of the method."""
    from mimkit.models import save_backbone
    from mimkit.ssl import build_method

    directory.mkdir(parents=True, exist_ok=True)
    method = build_method(recipe.method.to_dict())
    method.load_state_dict(state, strict=True)
    metadata = {"format": "mimkit-method-v1", "method": recipe.method.name}
    atomic_write(directory / MODEL_FILE, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    provenance = {"method": recipe.method.name, "steps": step, "data": recipe.data.source}
    if recipe.train.init_from is not None:
        provenance["init_from"] = recipe.train.init_from
    method.encoder.normalization = recipe.normalization.to_dict()
    save_backbone(method.encoder, directory, extra={"pretrained": provenance})
    save_exports = getattr(method, "save_exports", None)
    if save_exports is not None:
        save_exports(directory, provenance)


def load_method(run_dir: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a finished run's method from its ``recipe.yaml`` and ``model.safetensors`` (eval mode)."""
    from mimkit.ssl import build_method

    run_dir = Path(run_dir)
    for needed in (run_dir / RECIPE_FILE, run_dir / MODEL_FILE):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found; is {run_dir} a finished pretraining run directory?")
    recipe = load_recipe(run_dir / RECIPE_FILE, check_data=False)
    method = build_method(recipe.method.to_dict())
    method.load_state_dict(load_file(str(run_dir / MODEL_FILE), device=map_location), strict=True)
    return method.eval()


def summary(result: RunResult, recipe: Recipe, total_steps: int, task: str = "pretrain") -> str:
    """The one-screen report printed at the end of a run."""
    minutes, seconds = divmod(int(result.wall_time), 60)
    done = result.steps - result.resumed_from
    speed = done * recipe.batch.global_size / max(result.wall_time, 1e-9)
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    loss = "-"
    if result.final_loss is not None:
        loss = f"{result.first_loss:.4f} (first step) -> {result.final_loss:.4f} (last logged)"
    lines = [
        f"mimkit {task}: {recipe.method.name} on {recipe.method.backbone['name']} finished",
        f"  steps       {result.steps} of {total_steps}{resumed}, {recipe.world_size} rank(s), "
        f"global batch {recipe.batch.global_size}",
        f"  wall time   {minutes}m{seconds:02d}s ({speed:.1f} images/s)",
        f"  loss        {loss}",
        f"  encoder     {result.encoder_path} (+ encoder.json)",
        f"  model       {result.model_path}",
        f"  checkpoint  {result.checkpoint}",
        f"  metrics     {result.run_dir / METRICS_FILE}",
    ]
    if result.evaluation:
        split = recipe.eval.split
        lines.append(
            f"  {split + ' (last)':<11} " + ", ".join(f"{k} {v:.4g}" for k, v in result.evaluation.items())
        )
    if result.monitor or result.watch_seconds:
        m = result.monitor
        knn = (
            f"k-NN top-1 cls {m['monitor_knn_cls']:.1f}, patch mean {m['monitor_knn_patch_mean']:.1f} "
            f"at step {m['step']}; "
            if m
            else ""
        )
        share = result.watch_seconds / max(result.wall_time, 1e-9)
        took = f"monitor and pictures took {result.watch_seconds:.1f} s ({share:.1%} of the run)"
        lines.append(f"  monitor     {knn}{took}")
    if result.best is not None:
        b = result.best
        lines.append(f"  best        {b['metric']} {b['value']:.4g} at step {b['step']} -> {b['dir']}")
    return "\n".join(lines)
