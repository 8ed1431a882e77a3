"""What every masked-image-modelling method shares: an encoder, a mask generator, the epoch hook."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mimkit.models import Backbone
from mimkit.ssl.masking import MaskGenerator


class MaskedImageModel(nn.Module):
    """Base of the pretraining methods: ``encoder`` (a registry backbone, the part that is exported)
    and ``mask_generator``; ``default_mask`` is the recipe entry used when a recipe names no mask.

    Subclasses implement ``forward(batch, mask=None) -> dict`` with a ``loss``; the trainer calls
    :meth:`set_epoch` before every epoch.
    """

    default_mask: ClassVar[dict] = {"type": "random", "ratio": 0.75}

    def __init__(self, encoder: Backbone, mask_generator: MaskGenerator):
        super().__init__()
        self.encoder = encoder
        self.mask_generator = mask_generator

    def set_epoch(self, epoch: int) -> None:
        """Let an epoch-scheduled mask generator (e.g. ColorMAE's colour schedule) switch."""
        self.mask_generator.set_epoch(epoch)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks in the backward pass instead of keeping their activations.

        Applies to every part that supports it: the encoder (timm's flag, read by
        ``Backbone.run_blocks``) and MAE's decoder wherever a method uses it. Gradients are unchanged.
        """
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable

    def draw_mask(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(batch_size, L) bool masks from the generator, True = masked (torch's default RNG)."""
        return self.mask_generator(batch_size, self.encoder.grid_size, device=device)
