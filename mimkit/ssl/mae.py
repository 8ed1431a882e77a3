"""MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022).

Faithful to the official code (facebookresearch/mae, ``models_mae.py``): the encoder sees the
visible patches plus cls; a 512-wide, 8-deep decoder fills the masked positions with one shared
mask token, adds fixed sin-cos positions and predicts (per-patch normalised) pixels; the loss
is the MSE over masked patches only.
"""

from __future__ import annotations

import torch
from torch import nn

from mimkit.models import Backbone
from mimkit.ssl.base import MaskedImageModel
from mimkit.ssl.decoder import MAEDecoder
from mimkit.ssl.masking import MaskGenerator, ids_keep
from mimkit.ssl.registry import register_method


def init_mae_weights(module: nn.Module) -> None:
    """The official initialisation, applied to the whole model.

    xavier-uniform for every Linear (bias 0) and for the patch projection viewed as a Linear,
    LayerNorm 1/0, and normal(std 0.02) for cls and mask tokens. Frozen sin-cos tables are
    left as they are.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Backbone):
            w = m.patch_embed.proj.weight
            nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
            nn.init.zeros_(m.patch_embed.proj.bias)
            nn.init.normal_(m.cls_token, std=0.02)
        elif isinstance(m, MAEDecoder):
            nn.init.normal_(m.mask_token, std=0.02)


@register_method("mae")
class MAE(MaskedImageModel):
    """Masked autoencoder on a registry backbone.

    Args:
        encoder: the backbone, trained and exported.
        mask_generator: defaults to random masking at ratio 0.75 when built by name.
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio: decoder shape (paper: 512, 8, 16, 4).
        norm_pix_loss: standardise each target patch (on for every released MAE model).
    """

    default_mask = {"type": "random", "ratio": 0.75}

    def __init__(
        self,
        encoder: Backbone,
        mask_generator: MaskGenerator,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        super().__init__(encoder, mask_generator)
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_size
        out_dim = self.patch_size**2 * encoder.in_chans
        self.decoder = MAEDecoder(
            encoder.embed_dim,
            encoder.grid_size,
            out_dim,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
        )
        init_mae_weights(self)

    def forward(self, batch: dict, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct the masked patches of ``batch["image"]`` (B, C, H, W).

        Args:
            mask: optional (B, L) bool, True = masked; drawn from the mask generator (with
                torch's default RNG) when not given.

        Returns:
            ``loss`` (scalar), ``pred`` (B, L, p*p*C) and ``patch_mask`` (B, L); in training mode
            ``pred`` holds zeros at visible positions (see :meth:`MAEDecoder.pixel_loss`).
        """
        images = batch["image"]
        if mask is None:
            mask = self.draw_mask(images.shape[0], images.device)
        keep = ids_keep(mask)
        latent = self.encoder.forward_visible(images, keep)
        features = self.decoder.forward_features(latent, keep)
        loss, pred = self.decoder.pixel_loss(features, images, mask, self.patch_size, self.norm_pix_loss)
        return {"loss": loss, "pred": pred, "patch_mask": mask}
