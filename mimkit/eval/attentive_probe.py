"""Attentive probe: one cross-attention block with a learned query pools a frozen encoder's patch tokens,
then a linear layer classifies the pooled vector.

Why: a MIM encoder's information sits in its patch tokens, spread over the image; its cls token
receives no loss in pretraining (MAE App. A.1), and the mean of the tokens blurs what one region
carries. A learned query can read the region that matters. V-JEPA (Bardes et al. 2024), AIM
(El-Nouby et al. 2024), CAE (Chen et al. 2023) and CAPI (Darcet et al. 2025) report this probe
beside or instead of the linear one.

The head is V-JEPA's ``AttentiveClassifier`` (``src/models/attentive_pooler.py`` of
facebookresearch/jepa, depth 1): ``LayerNorm`` on the patch tokens; cross-attention from one
learned query (q, k, v projections with bias, ``num_heads`` heads); a residual MLP (ratio 4) behind
a ``LayerNorm``; ``Linear(dim, classes)``. It is built from timm's ``AttentionPoolLatent`` (the
query, the attention, the projection, the norm and the MLP), after a ``LayerNorm`` (V-JEPA's
``norm1``). One difference of form, none of function: V-JEPA adds the query itself back to the
attention output (``q + xattn(q, x)``), timm does not; the query is the same vector for every
image, so that residual is a constant that the projection's bias absorbs. V-JEPA's
initialisation is applied: every linear weight truncated normal std 0.02 with zero bias (the
classifier keeps PyTorch's default, as V-JEPA's does), the query std 0.02, the attention output
projection and the MLP's last layer divided by sqrt(2).

Hyperparameters (V-JEPA, ``configs/evals/vitl16_in1k.yaml`` and
``evals/image_classification_frozen/eval.py``): AdamW (betas 0.9, 0.999) at lr 1e-3, no warm-up,
cosine to 0 over the run; weight decay 1e-3 cosine to 1e-6 (biases and 1-D parameters excluded);
gradients clipped at norm 1.0; 20 epochs; batch 1024 (16 per GPU x 64 GPUs); the number of heads
is the encoder's (``num_heads=encoder.num_heads``: 16 for V-JEPA's ViT-L/16 and ViT-H/16). The
schedules step before each iteration, as V-JEPA's ``WarmupCosineSchedule`` and
``CosineWDSchedule`` do. For contrast: CAPI's probe has no norm or MLP (a query without projection,
heads of 64 dims) and sweeps lr x weight decay with AdamW (betas 0.9, 0.95) over 12,500 iterations
(``eval_classification.py``); AIM's puts an affine-free BatchNorm before k / v and has no MLP
(``aim/v1/torch/layers.py``); CAE trains it with SGD at lr 0.4 (the CAE paper).

Training images are augmented as DINOv2's linear probe does (RandomResizedCrop, bicubic, and a
flip), one frozen forward pass per batch; V-JEPA uses timm's AutoAugment and random erasing on PIL
images, which this package's tensor sources do not reach. ``cached=True`` trains on the patch
tokens of centre crops extracted once (every token map held in memory, its size printed before
extraction and refused when it would not fit): much faster, a different protocol, and labelled
``cached`` in every output. The reported top-1 is the last epoch's on the val split; the maximum
over epochs is reported only as information (it is selected on the split it scores).

On small sets the batch matters more than the paper's numbers suggest: V-JEPA's 1024 is 25,000
steps over ImageNet's 20 epochs, but 80 steps over 4096 images. On ``synthetic:textures``
(4096 / 1024 images, cached, the MAE demo encoder) batch 1024 reached 63.8% top-1 and batch 256
(320 steps, the rest V-JEPA's) 80.9%, so pass ``--batch-size 256`` or smaller for a few thousand
images. Read the probe against a random init (``--vs-random``): on that set the random init's
tokens reached 86.8%, above the pretrained encoder's, because a texture's period can be read from
a single patch, which random projections keep (MAE's linear probe on the cls token: 77.5% and
64.4%).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent
from torch import nn
from tqdm import tqdm

from mimkit.data import build_source
from mimkit.data.transforms import Normalization
from mimkit.eval.common import data_info, format_table, one_thread_on_cpu, result, write_json
from mimkit.eval.features import (
    classification_source,
    describe_encoder,
    input_normalization,
    num_classes_of,
    pretrained_and_random_init,
    require_labelled_source,
    require_labels,
    source_features,
)
from mimkit.eval.heads import score_head
from mimkit.eval.preflight import check_fits, format_bytes
from mimkit.eval.probe_data import (
    Batches,
    SampleOrder,
    augmented_batches,
    cached_batches,
    probe_train_transform,
)
from mimkit.eval.settings import ExtractSettings
from mimkit.models import Backbone

TOKENS = "patch_tokens"


@dataclass(frozen=True)
class AttentiveProbe:
    """The attentive probe's settings; every default is V-JEPA's (see the module docstring)."""

    epochs: int = 20
    batch_size: int = 1024  # images per optimiser step (V-JEPA: 16 per GPU x 64 GPUs)
    lr: float = 1e-3
    final_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-3  # cosine to final_weight_decay
    final_weight_decay: float = 1e-6
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    num_heads: int | None = None  # None: the encoder's (V-JEPA: 16 for ViT-L/H)
    mlp_ratio: float = 4.0
    seed: int = 0


def probe_settings(**overrides: Any) -> AttentiveProbe:
    """:class:`AttentiveProbe` with ``overrides`` (None values keep the default); unknown names are errors."""
    valid = {f.name for f in fields(AttentiveProbe)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown attentive-probe setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return AttentiveProbe(**{k: v for k, v in overrides.items() if v is not None})


class AttentiveHead(nn.Module):
    """V-JEPA's attentive classifier on (B, N, dim) tokens -> (B, num_classes) logits."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # V-JEPA's norm1: the keys and values read normed tokens
        self.pool = AttentionPoolLatent(
            dim, dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm
        )
        self.linear = nn.Linear(dim, num_classes)
        for module in self.pool.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pool.latent, std=0.02)
        with torch.no_grad():  # V-JEPA's rescaling of the residual branches' last layers (depth 1)
            self.pool.proj.weight.div_(math.sqrt(2.0))
            self.pool.mlp.fc2.weight.div_(math.sqrt(2.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(self.norm(tokens)))


def probe_plan(settings: AttentiveProbe, num_train: int, dim: int, encoder_heads: int) -> dict[str, Any]:
    """Derived settings: heads, steps per epoch (full batches only), total and warm-up steps.

    A value that cannot run is an error naming it and what would: the batch against the training
    split, the heads against the token width.
    """
    s = settings
    for name in ("epochs", "batch_size"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value} must be a positive integer (--{name.replace('_', '-')})")
    if not s.lr > 0 or s.final_lr < 0 or s.weight_decay < 0 or s.final_weight_decay < 0 or s.grad_clip < 0:
        raise ValueError(
            f"lr={s.lr:g} must be positive, and final_lr={s.final_lr:g}, weight_decay={s.weight_decay:g}, "
            f"final_weight_decay={s.final_weight_decay:g} and grad_clip={s.grad_clip:g} non-negative"
        )
    if not 0 <= s.warmup_epochs < s.epochs:
        raise ValueError(f"warmup_epochs={s.warmup_epochs:g} must be in [0, epochs={s.epochs})")
    heads = s.num_heads or encoder_heads
    if heads < 1 or dim % heads:
        valid = [h for h in range(1, min(dim, 64) + 1) if dim % h == 0]
        raise ValueError(
            f"num_heads={heads} does not divide the token width {dim}; valid: {', '.join(map(str, valid))} "
            "(--num-heads)"
        )
    steps = num_train // s.batch_size
    if steps == 0:
        raise ValueError(
            f"the training split has {num_train} images, fewer than one batch of {s.batch_size} (V-JEPA: "
            f"1024); the largest valid batch here is {num_train}: pass --batch-size {num_train} or smaller"
        )
    return {
        "num_heads": heads,
        "steps_per_epoch": steps,
        "total_steps": steps * s.epochs,
        "warmup_steps": int(s.warmup_epochs * steps),
    }


def vjepa_lr(step: int, total: int, warmup: int, lr: float, final_lr: float, start_lr: float = 0.0) -> float:
    """V-JEPA's ``WarmupCosineSchedule`` after ``step`` calls: a linear warm-up, then a half cosine
    to ``final_lr``."""
    if step < warmup:
        return start_lr + step / max(1, warmup) * (lr - start_lr)
    progress = (step - warmup) / max(1, total - warmup)
    return max(final_lr, final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def vjepa_wd(step: int, total: int, wd: float, final_wd: float) -> float:
    """V-JEPA's ``CosineWDSchedule`` after ``step`` calls: a half cosine from ``wd`` to ``final_wd``."""
    value = final_wd + (wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return max(final_wd, value) if final_wd <= wd else min(final_wd, value)


def _param_groups(head: nn.Module) -> list[dict[str, Any]]:
    """V-JEPA's groups: weight decay on matrices, none on biases and 1-D parameters (norms)."""
    decay, plain = [], []
    for name, p in head.named_parameters():
        (plain if name.endswith("bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay, "decay": True}, {"params": plain, "decay": False, "weight_decay": 0.0}]


def run_attentive_probe(
    batches: Batches,
    num_train: int,
    test: dict[str, torch.Tensor],
    num_classes: int,
    settings: AttentiveProbe | None = None,
    *,
    encoder_heads: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train the head on any batch source (``feats[TOKENS]`` (B, N, D)); ``test`` holds tokens and labels.

    Returns ``top1`` (last epoch, %), ``top1_per_epoch``, ``max_top1_over_epochs`` (selected on the
    scored split: information, not a result), ``train_loss_per_epoch``, ``plan`` and ``head``.
    """
    settings = settings or AttentiveProbe()
    device = torch.device(device)
    dim = test[TOKENS].shape[-1]
    plan = probe_plan(settings, num_train, dim, encoder_heads)
    steps, total = plan["steps_per_epoch"], plan["total_steps"]
    order = SampleOrder(num_train, steps * settings.batch_size, settings.epochs, settings.seed)
    per_epoch, losses = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = AttentiveHead(dim, num_classes, plan["num_heads"], settings.mlp_ratio).to(device)
        opt = torch.optim.AdamW(_param_groups(head), lr=settings.lr, weight_decay=settings.weight_decay)
        stream = batches(order, settings.batch_size)
        bar = tqdm(total=total, desc="attentive probe", disable=not progress, leave=False)
        step = 0
        for _ in range(settings.epochs):
            head.train()
            loss_sum = 0.0
            for _ in range(steps):
                step += 1  # V-JEPA steps its schedules before each iteration
                lr = vjepa_lr(step, total, plan["warmup_steps"], settings.lr, settings.final_lr)
                wd = vjepa_wd(step, total, settings.weight_decay, settings.final_weight_decay)
                for group in opt.param_groups:
                    group["lr"] = lr
                    if group["decay"]:
                        group["weight_decay"] = wd
                feats, labels = next(stream)
                loss = F.cross_entropy(head(feats[TOKENS]), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip > 0:
                    nn.utils.clip_grad_norm_(head.parameters(), settings.grad_clip)
                opt.step()
                loss_sum += loss.item()
                bar.update()
            losses.append(loss_sum / steps)
            per_epoch.append(score_head(head, test[TOKENS], test["label"], chunk=256)[0])
            bar.set_postfix(loss=f"{losses[-1]:.3f}", top1=f"{per_epoch[-1]:.1f}")
        bar.close()
    return {
        "top1": per_epoch[-1],
        "top1_per_epoch": per_epoch,
        "max_top1_over_epochs": max(per_epoch),
        "train_loss_per_epoch": losses,
        "plan": plan,
        "head": head.cpu(),
    }


def train_attentive_probe(
    train: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor],
    num_classes: int,
    settings: AttentiveProbe | None = None,
    *,
    encoder_heads: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """The probe on precomputed tokens: ``patch_tokens`` (N, P, D) and ``label`` (N,) in ``train``
    and ``test``."""
    with one_thread_on_cpu(torch.device(device)):
        return run_attentive_probe(
            cached_batches(train, device, keys=(TOKENS,)),
            len(train["label"]),
            test,
            num_classes,
            settings,
            encoder_heads=encoder_heads,
            device=device,
            progress=progress,
        )


# ----------------------------------------------------------------------------- source-level API


def token_bytes(encoder: Backbone, num_images: int) -> int:
    """Bytes of the float32 patch-token maps of ``num_images`` images (all other features are small)."""
    return num_images * encoder.patch_embed.num_patches * encoder.embed_dim * 4


def attentive_probe(
    encoder: Backbone,
    train_source: str,
    val_source: str | None = None,
    *,
    cached: bool = False,
    settings: AttentiveProbe | None = None,
    extract: ExtractSettings | None = None,
    log=print,
) -> dict[str, Any]:
    """Probe ``encoder``: train on ``train_source``'s train split, score ``val_source``'s val split.

    ``val_source`` defaults to ``train_source``. ``extract`` says how tokens are computed (its
    ``batch_size`` is the extraction batch; its device also trains the head); ``cached`` trains
    on centre-crop tokens extracted once instead of augmented images. Every check that needs no
    forward pass runs first (labels, the plan against the training split, the token memory); the
    memory the cached tokens take is given to ``log`` before extraction. Returns a result dict
    (see :mod:`mimkit.eval.common`) whose ``mode`` says ``augmented`` or ``cached``.
    """
    settings = settings or AttentiveProbe()
    extract = extract or ExtractSettings()
    extract = replace(extract, img_size=extract.image_size(encoder), n_last_blocks=1)
    device, progress, img_size = torch.device(extract.device), extract.progress, extract.img_size
    val_source = val_source or train_source
    plain = build_source(train_source, "train", None)
    require_labels(plain, train_source, "train")
    if val_source != train_source:
        require_labelled_source(val_source, "val")
    num_val = len(build_source(val_source, "val", None))
    plan = probe_plan(settings, len(plain), encoder.embed_dim, encoder.blocks[0].attn.num_heads)
    held = num_val + (len(plain) if cached else 0)
    need = token_bytes(encoder, held)
    grid = f"{encoder.patch_embed.num_patches} patches x {encoder.embed_dim} dims, float32"
    images = f"{len(plain)} train + {num_val} val images" if cached else f"{num_val} val images"
    what = f"the {'token' if cached else 'val token'} cache ({images} x {grid})"
    advice = "use fewer images (the source's train= / val= options), a smaller --img-size" + (
        ", or drop --cached (train on augmented images, one forward pass per batch)" if cached else ""
    )
    free = check_fits(need, "cpu", what, advice)
    if log is not None:
        log(f"{what}: {format_bytes(need)} in memory" + (f" (free: {format_bytes(free)})" if free else ""))
    test = source_features(encoder, val_source, "val", extract, tokens=True)
    num_classes = int(test["num_classes"])
    run = dict(encoder_heads=plan["num_heads"], device=device, progress=progress)
    if cached:
        train = source_features(encoder, train_source, "train", extract, tokens=True)
        num_classes = max(num_classes, int(train["num_classes"]))
        out = train_attentive_probe(train, test, num_classes, settings, **run)
    else:
        num_classes = max(num_classes, num_classes_of(plain))
        norm = input_normalization(encoder)
        augmented = classification_source(
            train_source, "train", probe_train_transform("grid", img_size, norm)
        )
        batches = augmented_batches(augmented, encoder, extract, seed=settings.seed, tokens=True)
        out = run_attentive_probe(batches, len(plain), test, num_classes, settings, **run)
    out.pop("head")
    mode = "cached" if cached else "augmented"
    settings_out = {
        "mode": mode,
        "precision": extract.precision,
        **asdict(settings),
        **out.pop("plan"),
        "optimizer": "AdamW (betas 0.9, 0.999), no weight decay on biases and norms",
        "head": "LayerNorm -> cross-attention from one learned query (timm AttentionPoolLatent: q/kv/proj, "
        "LayerNorm, MLP) -> Linear",
        "features": "final-normed patch tokens of the last block (cls excluded)",
        "augmentation": "none (centre crops, cached)" if cached else "RandomResizedCrop (bicubic) + flip",
        "token_bytes": need,
        "extract": extract.to_dict(),
    }
    data = data_info(train_source, val_source, img_size, len(plain), len(test["label"]), num_classes)
    note = (
        "cached: trained on patch tokens of centre crops extracted once, without augmentation (a fast "
        "variant, not the published protocol)"
        if cached
        else "augmented: one frozen forward pass of augmented images per batch (V-JEPA's protocol, with "
        "RandomResizedCrop + flip for its AutoAugment + random erasing)"
    )
    return result(
        "attentive_probe", "attentive-probe (v-jepa)", describe_encoder(encoder), data, settings_out, out,
        mode=mode, note=note,
    )  # fmt: skip


def compare_attentive(
    encoder: str | os.PathLike,
    train_source: str,
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
    """The attentive probe of ``encoder`` and of a random init of its shape, side by side.

    Both are loaded at ``extract.img_size`` on ``extract.device``; ``kwargs`` go to
    :func:`attentive_probe` (``cached``, ``settings``). The random init runs second, so every
    check fails on the first before any forward pass. Returns ``{"pretrained": result, "random
    init": result}``; prints the table when ``verbose``.
    """
    extract = extract or ExtractSettings()

    def run(model, log):
        return attentive_probe(model, train_source, val_source, extract=extract, log=log, **kwargs)

    out = pretrained_and_random_init(
        encoder, run, extract, checkpoint=checkpoint, seed=seed, normalization=normalization, verbose=verbose
    )
    if json_path is not None:
        write_json(json_path, out)
    if verbose:
        print(format_comparison(out), flush=True)
    return out


def format_attentive_probe(res: dict[str, Any]) -> str:
    """The human table of an :func:`attentive_probe` result."""
    s, r = res["settings"], res["results"]
    title = f"attentive probe ({res['mode']}) of {res['encoder']['spec']}" + (
        " [random init]" if res["encoder"].get("random_init") else ""
    )
    rows = [
        ["top-1 %, last epoch", r["top1"]],
        ["max top-1 % over epochs (picked on the scored split)", r["max_top1_over_epochs"]],
        ["epochs / steps per epoch / batch", f"{s['epochs']} / {s['steps_per_epoch']} / {s['batch_size']}"],
        [
            "AdamW lr / weight decay",
            f"{s['lr']:g} -> {s['final_lr']:g} / {s['weight_decay']:g} -> {s['final_weight_decay']:g}",
        ],  # fmt: skip
        ["heads / MLP ratio", f"{s['num_heads']} / {s['mlp_ratio']:g}"],
    ]
    return format_table(["", "value"], rows, title)


def format_comparison(res: dict[str, dict[str, Any]]) -> str:
    """Side-by-side table of a :func:`compare_attentive` result."""
    names = list(res)
    first = res[names[0]]
    rows = [
        ["attentive probe top-1 %, last epoch"] + [res[n]["results"]["top1"] for n in names],
        ["max over epochs (picked on the scored split)"]
        + [res[n]["results"]["max_top1_over_epochs"] for n in names],
    ]
    d, s = first["data"], first["settings"]
    title = (
        f"attentive probe ({first['mode']}) of {first['encoder']['spec']} vs a random init: train "
        f"{d['num_train']} / val {d['num_val']} images, {d['num_classes']} classes, {s['epochs']} epochs"
    )
    return format_table(["", *names], rows, title)
