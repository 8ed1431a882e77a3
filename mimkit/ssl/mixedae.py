"""MixedAE: Chen, Liu, Hong, Xu, Li, Yeung, "Mixed Autoencoder for Self-supervised Visual
Representation Learning" (CVPR 2023, arXiv 2303.17152). No official code was released; this file
is written from the paper's description and says below where it had to choose.

Mixing. With mixing ratio ``r`` (0.25), consecutive images of the micro-batch form groups of
``S = 1/r`` (4). For each group the ``N`` patch positions are split at random so that each image
owns exactly ``r * N`` of them, and ONE mixed sequence takes each position's patch (with its
position embedding) from its owner. One encoder pass over ``N`` tokens thus stands for ``S``
images each ``1 - r`` masked: MAE's encoder cost, plus quadratic attention over ``N`` tokens.

Homologous recognition (off with ``mixing: naive``, the paper's ablation of plain mixing):

- Homologous attention in the encoder blocks listed by ``homologous_blocks``: each patch query
  keeps its ``topk`` largest attention logits over the patch keys (``r * N`` by default, the
  number of its homologous patches) and the rest are set to -inf before the softmax. It adds no
  parameter: the blocks are timm's own, run through :func:`homologous_block_forward`, so
  ``method.encoder`` stays a plain registry backbone whose export loads into timm strictly, and
  in ``eval()`` mode, at fine-tuning and in every evaluation tool, attention is ordinary.
- A homologous contrastive loss (:func:`homologous_contrastive_loss`): supervised-contrastive
  over the encoder's patch features within each mixed sequence, positives = patches of the same
  source image, negatives = the others, cosine similarity over a temperature.
- ``homo_precision`` is logged: the share of the top-k kept patch keys that come from the
  query's own image (chance is about ``r``), the quantity homologous recognition should raise.

Segment embeddings: one learnable vector per group slot (S, encoder width), added at the decoder
input (default), the encoder input, both or nowhere (``segment_embed``).

Unmixing reconstruction: for each source image the decoder (MAE's, :class:`MAEDecoder`) gets the
encoder outputs at that image's positions (and the group's cls) and its mask token elsewhere, and
predicts the image's hidden patches: MAE's norm-pix MSE over its ``(1 - r) N`` unowned positions,
averaged over the images (all images hide the same count, so this is the mean of per-image
means). The decoder runs once per source image, exactly as MAE's does::

    loss = loss_rec + contrast_weight * loss_homo

Choices the paper does not pin down, and why the default:

- Which images are mixed: consecutive images of each rank's micro-batch (the loader shuffles),
  so no communication; the micro-batch must divide by ``S`` (clear error otherwise).
- The cls token: it is not from any image, so its query attends globally and every patch query
  always keeps the cls key on top of its ``topk`` patch keys; ``topk`` counts patch keys only, so
  ``topk = N`` is exactly ordinary attention. Ties among logits are broken by ``torch.topk``.
- The top-k selection: computed per head, per query, from the same scaled logits the softmax
  uses; it has no gradient (selection is piecewise constant), gradients flow through the kept
  logits as in the paper's "set the rest to -inf" description.
- ``homologous_blocks`` default ``"all"``: every encoder block; the paper's choice of layers
  could not be verified from its text.
- ``segment_embed`` default ``"decoder"``: at the encoder input it would label every patch with
  its source and hand the encoder the answer to homologous recognition. Note that with
  per-image unmixing every visible token of one decoder pass belongs to the same slot, so the
  decoder-side embedding marks only which slot is being reconstructed; ``"encoder"`` is the
  placement that carries ownership information (and makes the recognition task trivial).
  Initialised normal(0.02), like MAE's tokens.
- ``contrast_temperature`` 0.1: SupCon's (Khosla et al. 2020) default; not verified for MixedAE.
- ``contrast_proj_dim`` ``None`` (no projection head): the loss then shapes the encoder features
  directly, which is what makes them object-aware; an int adds SupCon's Linear-ReLU-Linear head
  (width -> width -> int), which is not part of the exported encoder.
- ``contrast_layer`` -1: the encoder output (after the final norm), the features the decoder and
  the downstream tasks read; another index takes that block's raw output.
- ``contrast_weight`` 1.0: the paper adds the loss to the reconstruction; the weight is untuned.
  SupCon starts near ``log(N - 1)`` (5.3 at N = 196), well above norm-pix MSE (about 1).
- Every position-split draw uses torch's default RNG (seeded by the trainer), as MAE's masks do.
- ``mask``: the recipe's generator is not sampled (the split is a partition, not independent
  masks); its ratio must equal ``1 - mix_ratio`` so a recipe cannot silently say two things. It
  defaults to random 0.75. ``method.mask_generator`` is :class:`PartitionMasks`, which draws the
  split as per-image masks, so tools that draw masks from a method get valid ones.

Outputs: scalars ``loss``, ``loss_rec``, ``loss_homo`` (unweighted, 0 in naive mode) and, in
training mode with homologous attention, ``homo_precision``; ``pred`` (B, L, p*p*C) and
``patch_mask`` (B, L, True = hidden from that image), per source image as MAE's, and ``owner``
(B/S, L): the slot owning each position of each mixed sequence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from mimkit.models import Backbone
from mimkit.ssl.base import MaskedImageModel
from mimkit.ssl.decoder import MAEDecoder
from mimkit.ssl.mae import init_mae_weights
from mimkit.ssl.masking import MaskGenerator, ids_keep
from mimkit.ssl.registry import register_method

MIXING = ("homologous", "naive")
SEGMENT_PLACES = ("decoder", "encoder", "both", "none")


# ---------------------------------------------------------------------------------------------
# Mixing: groups of S images, a random partition of the positions, one mixed sequence per group.


def group_size(mix_ratio: float) -> int:
    """S = 1 / r, checked to be an integer of at least 2."""
    size = round(1 / mix_ratio) if isinstance(mix_ratio, (int, float)) and mix_ratio > 0 else 0
    if size < 2 or not math.isclose(size * mix_ratio, 1.0, rel_tol=1e-6):
        raise ValueError(f"mix_ratio must be 1/S for an integer S >= 2 (0.5, 0.25, ...), got {mix_ratio!r}")
    return size


def split_positions(
    num_groups: int,
    num_patches: int,
    size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(G, N) long owner slot in [0, S) of each position; each slot owns exactly N / S positions."""
    if num_patches % size:
        raise ValueError(
            f"{num_patches} patches do not split evenly among {size} images per group; "
            f"choose a mix_ratio whose group size divides {num_patches}"
        )
    perm = torch.rand(num_groups, num_patches, generator=generator).argsort(dim=1)
    slots = torch.arange(num_patches).div(num_patches // size, rounding_mode="floor")
    owner = torch.empty_like(perm).scatter_(1, perm, slots.expand(num_groups, -1))
    return owner.to(device) if device is not None else owner


def owner_from_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(G, N) owner slots from a per-image (B, N) mask (True = not owned by that image).

    Raises a ValueError unless, in every group, each position is visible to exactly one image
    and each image sees exactly N / S positions.
    """
    b, n = mask.shape
    visible = (~mask.bool()).view(b // size, size, n)
    if not bool((visible.sum(1) == 1).all()) or not bool((visible.sum(2) == n // size).all()):
        raise ValueError(
            f"a MixedAE mask must partition each group's {n} positions among its {size} images, "
            f"{n // size} each (False = owned by that image)"
        )
    return visible.long().argmax(dim=1)


def mix(tokens: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(B, N, D) per-image tokens -> (G, N, D) mixed sequences: position j of group g is taken
    from image ``g * S + owner[g, j]``."""
    g, n = owner.shape
    grouped = tokens.view(g, -1, n, tokens.shape[-1])
    index = owner[:, None, :, None].expand(-1, 1, -1, tokens.shape[-1])
    return grouped.gather(1, index).squeeze(1)


def image_masks(owner: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N) bool, True where image ``g * S + s`` does not own the position (its hidden patches)."""
    slots = torch.arange(size, device=owner.device)
    return (owner[:, None, :] != slots[None, :, None]).flatten(0, 1)


class PartitionMasks(MaskGenerator):
    """MixedAE's split as per-image masks (True = hidden from that image), ``method.mask_generator``.

    Consecutive groups of ``size`` rows partition the positions: each position is visible to exactly
    one image of its group, each image sees ``N / size``. Tools that draw a method's masks (e.g.
    the reconstruction pictures) thus get masks that ``MixedAE.forward`` accepts.
    """

    def __init__(self, size: int):
        super().__init__(1 - 1 / size)
        self.size = size

    def __call__(self, batch_size, grid_size, generator=None, device=None) -> torch.Tensor:
        return self.sample(batch_size, grid_size, generator).to(device or "cpu")

    def sample(self, batch_size: int, grid_size: tuple[int, int], generator: torch.Generator | None):
        if batch_size % self.size:
            raise ValueError(f"{batch_size} images do not split into groups of {self.size}")
        owner = split_positions(batch_size // self.size, grid_size[0] * grid_size[1], self.size, generator)
        return image_masks(owner, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


# ---------------------------------------------------------------------------------------------
# Homologous attention: top-k over the patch keys, run through timm's own blocks.


def topk_keep(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(..., 1 + N, 1 + N) bool: which keys each query keeps.

    Patch queries keep their ``k`` largest patch-key logits plus the cls key (index 0); the cls
    query keeps every key.
    """
    keep = torch.zeros_like(logits, dtype=torch.bool)
    idx = logits[..., 1:, 1:].topk(k, dim=-1).indices
    keep[..., 1:, 1:] = torch.zeros_like(keep[..., 1:, 1:]).scatter_(-1, idx, True)
    keep[..., 1:, 0] = True
    keep[..., 0, :] = True
    return keep


def homologous_attention(
    attn: Attention, x: torch.Tensor, k: int, owner: torch.Tensor | None = None, stats: list | None = None
) -> torch.Tensor:
    """timm ``Attention.forward`` with top-k homologous sparsification, using ``attn``'s own weights.

    Args:
        attn: a timm ``Attention`` (its qkv, norms, gate, dropouts and proj are used as they are).
        x: (G, 1 + N, D), cls first.
        k: patch keys kept per patch query.
        owner: optional (G, N) owner slots; with ``stats`` the homologous precision of the kept
            patch keys is appended to ``stats`` (no gradient).
    """
    b, length, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, key, v = qkv.unbind(0)
    q, key = attn.q_norm(q), attn.k_norm(key)
    with torch.no_grad():
        logits = (q * attn.scale) @ key.transpose(-2, -1)
        keep = topk_keep(logits, k)
        if owner is not None and stats is not None:
            same = owner[:, :, None] == owner[:, None, :]  # (G, N, N) query vs key image
            kept = keep[..., 1:, 1:]
            stats.append((kept & same[:, None]).sum().float() / kept.sum())
    # The kept-key mask reproduces "-inf before the softmax" exactly and lets SDPA pick a fused kernel.
    out = F.scaled_dot_product_attention(
        q, key, v, attn_mask=keep, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    out = attn.norm(out.transpose(1, 2).reshape(b, length, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def homologous_block_forward(
    block: Block, x: torch.Tensor, k: int, owner: torch.Tensor | None = None, stats: list | None = None
) -> torch.Tensor:
    """timm ``Block.forward`` with its attention made homologous; no module is changed or added."""
    x = x + block.drop_path1(block.ls1(homologous_attention(block.attn, block.norm1(x), k, owner, stats)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


# ---------------------------------------------------------------------------------------------
# Homologous contrastive loss.


def homologous_contrastive_loss(
    features: torch.Tensor, owner: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised-contrastive loss within each mixed sequence (Khosla et al. 2020, "L_out").

    ``L = mean_{g,i} -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) )``
    with ``s`` the cosine similarity between patch features of the same sequence and ``P(i)`` the
    other patches of ``i``'s source image.

    Args:
        features: (G, N, D) patch features of the mixed sequences (no cls).
        owner: (G, N) source slot of each position; every image owns at least 2 positions.
        temperature: t.
    """
    z = F.normalize(features.float(), dim=-1)
    sim = z @ z.transpose(1, 2) / temperature
    eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    log_prob = sim - sim.masked_fill(eye, float("-inf")).logsumexp(dim=-1, keepdim=True)
    positive = (owner[:, :, None] == owner[:, None, :]) & ~eye
    per_anchor = -(log_prob * positive).sum(-1) / positive.sum(-1)
    return per_anchor.mean()


# ---------------------------------------------------------------------------------------------
# The method.


@register_method("mixedae")
class MixedAE(MaskedImageModel):
    """Mixed autoencoder with homologous recognition on a registry backbone.

    Args:
        encoder: the backbone, trained and exported (plain: homologous attention is parameter-free).
        mask_generator: the recipe's, only checked: its ratio must be ``1 - mix_ratio``; it is
            replaced by :class:`PartitionMasks` (see the module docstring).
        mix_ratio: r; groups of 1/r images, each owning r * N positions of its mixed sequence.
        mixing: ``homologous`` (the paper) or ``naive`` (plain mixing: no homologous attention and
            no contrastive loss, the paper's ablation).
        homologous_blocks: ``"all"`` or the indices of the encoder blocks with homologous attention.
        topk: patch keys kept per patch query; ``None`` means r * N.
        segment_embed: where the per-slot segment embeddings are added: ``decoder`` (default),
            ``encoder``, ``both`` or ``none``.
        contrast_weight, contrast_temperature, contrast_proj_dim, contrast_layer: the homologous
            contrastive loss's weight, temperature, optional head width and feature block.
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio: MAE's decoder (512, 8, 16, 4).
        norm_pix_loss: standardise each target patch, as MAE.
    """

    default_mask = {"type": "random", "ratio": 0.75}

    def __init__(
        self,
        encoder: Backbone,
        mask_generator: MaskGenerator,
        mix_ratio: float = 0.25,
        mixing: Literal[MIXING] = "homologous",
        homologous_blocks: Literal["all"] | list[int] = "all",
        topk: int | None = None,
        segment_embed: Literal[SEGMENT_PLACES] = "decoder",
        contrast_weight: float = 1.0,
        contrast_temperature: float = 0.1,
        contrast_proj_dim: int | None = None,
        contrast_layer: int = -1,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
    ):
        self.group_size = group_size(mix_ratio)
        n, depth = encoder.num_patches, len(encoder.blocks)
        if n % self.group_size:
            raise ValueError(
                f"{n} patches do not split evenly among {self.group_size} images (mix_ratio {mix_ratio}); "
                f"the group size must divide the number of patches"
            )
        ratio = getattr(mask_generator, "ratio", None)
        if ratio is None or not math.isclose(ratio, 1 - mix_ratio, abs_tol=1e-6):
            raise ValueError(
                f"mask ratio {ratio!r} must equal 1 - mix_ratio = {1 - mix_ratio:g}: each image of a "
                f"group owns mix_ratio of the positions and has the rest hidden"
            )
        if mixing not in MIXING:
            raise ValueError(f"unknown mixing {mixing!r}; valid: {', '.join(MIXING)}")
        if segment_embed not in SEGMENT_PLACES:
            raise ValueError(f"unknown segment_embed {segment_embed!r}; valid: {', '.join(SEGMENT_PLACES)}")
        if homologous_blocks == "all":
            blocks = list(range(depth))
        elif not all(-depth <= i < depth for i in homologous_blocks):
            raise ValueError(
                f"homologous_blocks must be 'all' or a list of block indices in [-{depth}, {depth}), "
                f"got {homologous_blocks!r}"
            )
        else:
            blocks = sorted({i % depth for i in homologous_blocks})
        self.topk = n // self.group_size if topk is None else topk
        if not 1 <= self.topk <= n:
            raise ValueError(f"topk must be in [1, {n}] (the patch count), got {topk!r}")
        if not contrast_weight >= 0:
            raise ValueError(f"contrast_weight must be >= 0, got {contrast_weight!r}")
        if not contrast_temperature > 0:
            raise ValueError(f"contrast_temperature must be > 0, got {contrast_temperature!r}")
        if not -depth <= contrast_layer < depth:
            raise ValueError(
                f"contrast_layer must be a block index in [-{depth}, {depth}), got {contrast_layer}"
            )
        if contrast_proj_dim is not None and contrast_proj_dim < 1:
            raise ValueError(f"contrast_proj_dim must be positive or null, got {contrast_proj_dim!r}")

        super().__init__(encoder, PartitionMasks(self.group_size))  # the recipe's mask was checked above
        self.mix_ratio = mix_ratio
        self.mixing = mixing
        self.homologous_blocks = set(blocks) if mixing == "homologous" else set()
        self.segment_place = segment_embed
        self.contrast_weight = contrast_weight if mixing == "homologous" else 0.0
        self.contrast_temperature = contrast_temperature
        self.contrast_layer = contrast_layer % depth
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = encoder.patch_size
        dim = encoder.embed_dim
        self.decoder = MAEDecoder(
            dim,
            encoder.grid_size,
            self.patch_size**2 * encoder.in_chans,
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            mlp_ratio=decoder_mlp_ratio,
        )
        self.segment_embed = (
            nn.Parameter(torch.zeros(self.group_size, dim)) if segment_embed != "none" else None
        )
        self.contrast_head = (
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, contrast_proj_dim))
            if contrast_proj_dim is not None and self.contrast_weight > 0
            else None
        )
        init_mae_weights(self)
        if self.segment_embed is not None:
            nn.init.normal_(self.segment_embed, std=0.02)

    def _encode(self, images: torch.Tensor, owner: torch.Tensor, stats: list):
        """Mixed sequences through the encoder: ((G, 1 + N, D) normed output, (G, N, D) contrast feats)."""
        enc = self.encoder
        x = mix(enc.patch_tokens(images), owner)
        if self.segment_place in ("encoder", "both"):
            x = x + self.segment_embed[owner]
        homologous = self.homologous_blocks if self.training else ()

        def block_forward(i: int, block: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
            if i not in homologous:
                return None
            return homologous_block_forward(block, h, self.topk, owner, stats)

        last = len(enc.blocks) - 1
        taps = (self.contrast_layer,) if self.contrast_layer != last else ()
        x, tapped = enc.run_blocks(enc.with_prefix(x), block_forward, taps)
        x = enc.norm(x)
        feats = x[:, 1:] if self.contrast_layer == last else tapped[self.contrast_layer][:, 1:]
        return x, feats

    def forward(self, batch: dict, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mix ``batch["image"]`` (B, C, H, W) in groups, encode, unmix and reconstruct.

        Args:
            mask: optional (B, L) bool, True = hidden from that image; in each group of S
                consecutive images it must give each position to exactly one image, r * L each.
                Drawn at random (torch's default RNG) when not given.
        """
        images = batch["image"]
        b, size = images.shape[0], self.group_size
        if b % size:
            raise ValueError(
                f"a batch of {b} images does not split into groups of {size} (mix_ratio {self.mix_ratio}): "
                f"the per-rank micro-batch (batch.micro_size) must be a multiple of {size}"
            )
        n = self.encoder.num_patches
        if mask is None:
            owner = split_positions(b // size, n, size, device=images.device)
        else:
            owner = owner_from_mask(mask.to(images.device), size)
        stats: list[torch.Tensor] = []
        latent, feats = self._encode(images, owner, stats)

        # Unmixing: image g*S+s gets the group's cls and the latents at the positions slot s owns.
        patch_mask = image_masks(owner, size)
        keep = ids_keep(patch_mask)  # (B, r*N), ascending
        group_latent = latent.repeat_interleave(size, dim=0)
        visible = group_latent[:, 1:].gather(1, keep[..., None].expand(-1, -1, latent.shape[-1]))
        if self.segment_place in ("decoder", "both"):
            slots = torch.arange(b, device=images.device) % size
            visible = visible + self.segment_embed[slots][:, None]
        features = self.decoder.forward_features(torch.cat([group_latent[:, :1], visible], dim=1), keep)
        loss_rec, pred = self.decoder.pixel_loss(
            features, images, patch_mask, self.patch_size, self.norm_pix_loss
        )

        out = {"loss_rec": loss_rec}
        if self.contrast_weight > 0:
            z = self.contrast_head(feats) if self.contrast_head is not None else feats
            loss_homo = homologous_contrastive_loss(z, owner, self.contrast_temperature)
        else:
            loss_homo = loss_rec.new_zeros(())
        out["loss"] = loss_rec + self.contrast_weight * loss_homo
        out["loss_homo"] = loss_homo
        if stats:
            out["homo_precision"] = torch.stack(stats).mean()
        out.update(pred=pred, patch_mask=patch_mask, owner=owner)
        return out
