"""Fine-tuning as a method: a pretrained encoder, a classifier head, Mixup/CutMix and a soft-target loss.

MAE's end-to-end fine-tuning (He et al. 2022, appendix A.3; facebookresearch/mae
``main_finetune.py`` and ``models_vit.py``), built from timm's parts: every token goes through
the encoder, the patch tokens are averaged (global pooling) into a *new* LayerNorm (``fc_norm``;
the pretrained final ``norm`` is not used) and a linear head initialised at std 2e-5; batches are
mixed with ``timm.data.Mixup`` (Mixup 0.8, CutMix 1.0, switch 0.5, label smoothing 0.1) and the
loss is ``timm.loss.SoftTargetCrossEntropy``. Drop path is the backbone's ``drop_path_rate``
(0.1 for ViT-B) and layer-wise lr decay the optimiser's (``optim.layer_decay``, through
:meth:`FineTune.group_matcher`).

It is a registered method like the pretraining ones, so the same trainer runs it: ``forward``
returns ``{"loss"}``, and :meth:`FineTune.evaluate` gives the top-1/top-5 counts the trainer's
``eval`` section logs. The pretrained weights come from ``train.init_from``; without it the
encoder starts from timm's random initialisation, the floor a fine-tune is read against.

Deviations: MAE deletes the encoder's ``norm`` when pooling; here it stays (frozen, unused) so
the fine-tuned encoder still exports as a complete backbone (``encoder.safetensors``). The
position table is trained only when the backbone's is learnable (``pos_embed: learn``, as the
fine-tune recipes set; MAE's fine-tuning model has a learned table initialised from the
checkpoint's sin-cos values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from mimkit.models import Backbone
from mimkit.ssl.registry import register_method

GLOBAL_POOLS = ("avg", "token")


def check_finetune_options(options: dict[str, Any], where: str = "") -> None:
    """Value rules of :class:`FineTune`'s options; a ValueError names the key (``where`` + key)."""

    def require(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{where}{key} must be {allowed}, got {options[key]!r}")

    def present(key: str) -> bool:
        return options.get(key) is not None

    if present("num_classes"):
        require(options["num_classes"] >= 1, "num_classes", "a positive integer (classes of the head)")
    if present("global_pool"):
        require(options["global_pool"] in GLOBAL_POOLS, "global_pool", f"one of {', '.join(GLOBAL_POOLS)}")
    if present("head_init_std"):
        require(options["head_init_std"] > 0, "head_init_std", "a positive std (MAE: 2e-5)")
    for key in ("mixup", "cutmix"):
        if present(key):
            require(options[key] >= 0, key, "a Beta alpha >= 0 (0: off)")
    for key in ("mixup_prob", "mixup_switch_prob"):
        if present(key):
            require(0 <= options[key] <= 1, key, "a probability in [0, 1]")
    if present("label_smoothing"):
        require(0 <= options["label_smoothing"] < 1, "label_smoothing", "a number in [0, 1)")


@register_method("finetune")
class FineTune(nn.Module):
    """An encoder with a classification head, trained on labelled batches.

    Args:
        encoder: the backbone (weights from ``train.init_from``, else random).
        num_classes: classes of the head.
        global_pool: ``avg`` (mean of the patch tokens, then ``fc_norm``; MAE's fine-tuning) or
            ``token`` (the cls token after the encoder's final norm; MAE's ``--cls_token``).
        head_init_std: std of the head's truncated-normal initialisation (MAE: 2e-5).
        mixup, cutmix: Beta alphas of Mixup and CutMix (0 turns one off; both 0: no mixing).
        mixup_prob: probability of mixing a batch; mixup_switch_prob: of CutMix when both are on.
        label_smoothing: of the mixed targets, or of the plain cross-entropy without mixing.
    """

    # What evaluate() returns, averaged per image, and which way is better (the trainer's eval.best_metric).
    eval_metrics: ClassVar[dict[str, str]] = {"top1": "max", "top5": "max", "loss": "min"}
    check_options = staticmethod(check_finetune_options)

    def __init__(
        self,
        encoder: Backbone,
        num_classes: int = 1000,
        global_pool: Literal["avg", "token"] = "avg",
        head_init_std: float = 2e-5,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        super().__init__()
        check_finetune_options(
            {
                "num_classes": num_classes,
                "global_pool": global_pool,
                "head_init_std": head_init_std,
                "mixup": mixup,
                "cutmix": cutmix,
                "mixup_prob": mixup_prob,
                "mixup_switch_prob": mixup_switch_prob,
                "label_smoothing": label_smoothing,
            }
        )
        self.encoder = encoder
        self.num_classes, self.global_pool = num_classes, global_pool
        dim = encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if global_pool == "avg" else nn.Identity()
        if global_pool == "avg":
            encoder.norm.requires_grad_(False)  # replaced by fc_norm (see the module docstring)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)
        self.label_smoothing = label_smoothing
        self.mixup = None
        if (mixup > 0 or cutmix > 0) and mixup_prob > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.soft_loss = SoftTargetCrossEntropy()

    def set_epoch(self, epoch: int) -> None:
        """Nothing follows the epoch here (the trainer calls this for every method)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the encoder's blocks in the backward pass (``train.grad_checkpointing``)."""
        self.encoder.set_grad_checkpointing(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """How timm's layer decay numbers the parameters, as MAE's ``get_layer_id_for_vit`` does.

        Layer 0 is the stem (cls token, position table, patch embedding), block ``i`` is layer
        ``i + 1``; everything unmatched (``fc_norm``, ``head``, the encoder's final ``norm``) is
        the top layer, which keeps the full lr.
        """
        return {
            "stem": r"^encoder\.(?:cls_token|reg_token|pos_embed|patch_embed)",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None)],
        }

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits, as timm's ViT classifier of the same pooling."""
        enc = self.encoder
        x, _ = enc.run_blocks(enc.with_prefix(enc.patch_tokens(images)))
        if self.global_pool == "avg":
            pooled = self.fc_norm(x[:, enc.num_prefix_tokens :].mean(dim=1))
        else:
            pooled = enc.norm(x)[:, 0]
        return self.head(pooled)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training loss of ``batch`` (``image`` (B, C, H, W), ``label`` (B,)); mixes it in training mode.

        Mixup mixes ``batch["image"]`` in place (timm's), so B must be even when mixing is on.
        """
        images, labels = batch["image"], batch["label"]
        if self.training and self.mixup is not None:
            images, targets = self.mixup(images, labels)
            return {"loss": self.soft_loss(self.logits(images), targets)}
        return {"loss": F.cross_entropy(self.logits(images), labels, label_smoothing=self.label_smoothing)}

    @torch.no_grad()
    def evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over ``batch`` of :attr:`eval_metrics` (top-1/top-5 in %, plain cross-entropy) and ``count``.

        Top-5 counts a hit in the ``min(5, num_classes)`` highest logits.
        """
        logits = self.logits(batch["image"]).float()
        labels = batch["label"]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        return {
            "count": torch.tensor(float(len(labels)), device=logits.device),
            "top1": 100.0 * top[:, 0].sum().float(),
            "top5": 100.0 * top.any(dim=-1).sum().float(),
            "loss": F.cross_entropy(logits, labels, reduction="sum"),
        }

    def save_exports(self, directory: str | Path, provenance: dict[str, Any]) -> list[Path]:
        """Beside the encoder, the classifier as timm reads it (see :mod:`mimkit.finetune.export`)."""
        from mimkit.finetune.export import save_classifier

        return [save_classifier(self, directory, provenance)]
