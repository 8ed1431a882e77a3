"""A plain timm fine-tuning step, the yardstick ``benchmark.py step --method finetune`` times against.

What MAE's ``main_finetune.py`` runs per step, on timm's own parts: ``timm.create_model`` (the
``VisionTransformer`` classifier with global pooling and ``fc_norm``), ``timm.data.Mixup``,
``timm.loss.SoftTargetCrossEntropy``, and plain ``torch.optim.AdamW`` over timm's
``param_groups_layer_decay`` with each group's lr set to ``lr * lr_scale`` (as MAE's
``adjust_learning_rate``), no DeepSpeed. :meth:`TimmFinetunePath.from_finetune` copies the weights of
mimkit's :class:`~mimkit.finetune.classifier.FineTune` through its classifier export, so both paths
compute the same model.
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn

from mimkit.finetune.export import classifier_config, classifier_state


class TimmFinetunePath:
    """One fine-tuning step the plain way: mix, forward, soft-target loss, backward, AdamW."""

    def __init__(
        self,
        model: nn.Module,
        mixup: Mixup | None,
        images,
        labels,
        lr: float,
        layer_decay: float | None,
        precision: str = "fp32",
    ):
        self.name = "timm fine-tune"
        self.autocast = precision == "fp16"  # fp32 weights under fp16 autocast, as MAE's AMP step
        self.scaler = torch.amp.GradScaler(images.device.type) if self.autocast else None
        self.model = model
        self.mixup = mixup
        self.images, self.labels = images, labels
        self.device = images.device
        self.lr = lr
        groups = param_groups_layer_decay(
            model,
            weight_decay=0.05,
            no_weight_decay_list=model.no_weight_decay(),
            layer_decay=layer_decay or 1.0,
        )
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
        self.loss = SoftTargetCrossEntropy()

    @classmethod
    def from_finetune(
        cls,
        finetune: nn.Module,
        images,
        labels,
        lr: float,
        layer_decay: float | None,
        precision: str = "fp32",
    ):
        """The timm classifier of ``finetune``'s shape with its weights, drop path and Mixup settings."""
        import timm

        config = classifier_config(finetune)
        kwargs = dict(config["timm_kwargs"], img_size=tuple(config["timm_kwargs"]["img_size"]))
        kwargs["drop_path_rate"] = finetune.encoder.drop_path_rate
        model = timm.create_model(config["timm_model"], pretrained=False, **kwargs)
        model.load_state_dict(classifier_state(finetune), strict=True)
        model.pos_embed.requires_grad_(finetune.encoder.pos_embed.requires_grad)
        model = model.to(images.device).train()
        return cls(model, finetune.mixup, images, labels, lr, layer_decay, precision)

    @property
    def module(self) -> nn.Module:
        return self.model

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        images, targets = self.images.clone(), self.labels
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
                loss = self.loss(self.model(images), targets)
            else:
                loss = nn.functional.cross_entropy(self.model(images), targets)
        value = float(loss.detach())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return value

    def flops(self) -> dict[str, float]:
        from benchmarks.step import flop_split

        def run_step():
            self.model(self.images).sum().backward()

        split = flop_split(
            self.model, run_step, lambda n: n in ("patch_embed", "blocks", "norm", "fc_norm"), lambda n: False
        )
        self.model.zero_grad(set_to_none=True)
        return split

    def mask_seconds(self) -> None:
        return None
