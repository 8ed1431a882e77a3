"""Painter: Wang et al., "Images Speak in Images: A Generalist Painter for In-Context Visual
Learning" (CVPR 2023), written from the paper.

Painter trains masked image modelling on stitched (input, output) pairs of the same task, where
every dense task's output is rendered as a 3-channel image; at inference a prompt pair and the
query are stitched and the model paints the query's output. Here:

- **Sample.** Each batch image is paired with its neighbour in the (shuffled) batch (for
  ``foreground``, with a batch image holding the same class); both pairs take the same task,
  drawn per canvas from ``tasks``: ``segmentation`` (the batch's ``mask`` as a fixed colour map,
  :class:`~mimkit.ssl.canvas.Palette` over ``num_classes``), ``foreground`` (one class present
  in the first pair's mask, white on black in both pairs: the prompt names the class, Bar et
  al.'s binary task),
  ``edges`` (Sobel magnitude of the image, as grey) or ``identity`` (the image itself). Images
  and masks are resized to the cell size ``img_size / 2 - separator`` (bilinear / nearest) and
  stitched on the 2x2 canvas of :mod:`mimkit.ssl.canvas`: top row the first pair, bottom row the
  second. The recipe's source
  therefore provides images at the backbone's ``img_size`` (the usual transform) and this method
  shrinks them; nothing in the data layer changes.
- **Mask** (:class:`CanvasMasking`, ``{type: canvas}``): ``ratio`` of the canvas patches masked,
  ``output_share`` of them on the output half (right column), the rest on the inputs; with
  probability ``answer_prob`` a canvas has its whole bottom-right quadrant masked, the inference
  mask, plus its remaining budget at random. The default (0.25, 1.0, 0.5) masks half of the
  outputs and no input, Painter's share; half the canvases are then exactly the inference mask.
- **Model.** Painter's two streams on the canvas's two columns: the left column (support image
  over query image) is the image stream, the right column (support output over the answer) the
  output stream. Both are patch-embedded by the backbone, take the same positions (the left
  column's) plus a learned segment token each, and masked patches take a mask token (SimMIM-
  style: the encoder sees every position). As in Painter's model, the streams hold patch tokens
  only: the backbone's cls token is frozen and unused (a painter encoder's cls output is its
  initial query attending over trained patch tokens; pool the patch tokens for frozen
  features). The streams run as one batch through blocks
  ``0..merge_block`` and are then averaged token by token (Painter: after block 2), so every
  later token holds an image patch and its output patch together and only the in-context part
  of the task (which colour to paint, read from the prompt pair) goes through attention.
  :class:`PainterHead` paints from the final-normed tokens of four blocks (the last of each
  quarter of the encoder, ViT-L: 5, 11, 17, 23): concatenated, a linear layer to
  ``decoder_dim`` channels per pixel, a 3x3 conv, LayerNorm, GELU and a 1x1 conv to RGB.
- **Loss.** Smooth-L1 (beta 0.01, the paper's) on the raw (input-normalised, not per-patch
  normalised) pixels of the masked output patches, so the model paints absolute colours.

The encoder is the registry backbone unchanged (the mask and segment tokens and the head belong
to the method): exported, loaded by ``load_backbone`` and into timm like every other, and
``forward_features`` on a plain image is the usual ViT.

Deviations, and why:

- Painter stacks prompt over query (896 x 448 per stream); here the streams are the columns of
  Bar et al.'s 2x2 canvas, so one prompting tool and one canvas serve MAE and Painter alike.
- Painter masks block-wise (784 of 1568 output patches, up to 392 per block); here masking is
  random per patch. ``output_share < 1`` also hides input patches (mask tokens in the image
  stream), which are not predicted: Painter paints outputs only.
- Painter's tasks come from labelled datasets (depth, segmentation, keypoints, denoising, ...);
  here the outputs come from the batch's ``mask`` (sources with ``segmentation=1``, ``voc:``,
  ``ade20k:``) or from the image itself (edges, identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from mimkit.data.transforms import Normalization
from mimkit.models import Backbone
from mimkit.ssl import canvas as cv
from mimkit.ssl.base import MaskedImageModel
from mimkit.ssl.mae import init_mae_weights
from mimkit.ssl.masking import MaskGenerator, num_masked, register_mask
from mimkit.ssl.registry import register_method
from mimkit.ssl.targets import patchify

TASKS = ("segmentation", "foreground", "edges", "identity")
DEFAULT_TASKS = ("segmentation", "foreground")
SMOOTH_L1_BETA = 0.01  # Painter's


@register_mask("canvas")
class CanvasMasking(MaskGenerator):
    """Random masking of a 2x2 canvas with most of the mask on the output half (right column).

    Args:
        ratio: share of all patches masked; 0.25 with ``output_share`` 1 masks half of the output
            half and none of the inputs, as Painter masks half of its output stream only.
        output_share: share of the masked patches that lie on the output half; the count there is
            capped at the half's size and the rest falls on the inputs.
        answer_prob: probability that a canvas masks its whole bottom-right quadrant (the
            inference mask) first; needs the output budget to cover a quadrant.
    """

    def __init__(self, ratio: float = 0.25, output_share: float = 1.0, answer_prob: float = 0.5):
        super().__init__(ratio)
        if not 0.0 <= output_share <= 1.0:
            raise ValueError(f"output_share must be in [0, 1], got {output_share!r}")
        if not 0.0 <= answer_prob <= 1.0:
            raise ValueError(f"answer_prob must be in [0, 1], got {answer_prob!r}")
        self.output_share = float(output_share)
        self.answer_prob = float(answer_prob)

    def counts(self, num_patches: int) -> tuple[int, int]:
        """(masked on the output half, masked on the input half) for a canvas of ``num_patches``."""
        total = num_masked(num_patches, self.ratio)
        half = num_patches // 2
        on_output = min(round(self.output_share * total), half)
        on_input = total - on_output
        if on_input > half:  # a low share at a high ratio: the inputs are full, the rest spills over
            on_input, on_output = half, total - half
        return on_output, on_input

    def sample(self, batch_size, grid_size, generator):
        length = grid_size[0] * grid_size[1]
        output = cv.output_half_mask(grid_size)
        answer = cv.answer_patch_mask(grid_size)
        on_output, on_input = self.counts(length)
        out_idx, in_idx = output.nonzero()[:, 0], (~output).nonzero()[:, 0]
        noise_out = torch.rand(batch_size, len(out_idx), generator=generator)
        if self.answer_prob > 0:
            if on_output < int(answer.sum()):
                raise ValueError(
                    f"answer_prob={self.answer_prob} needs at least {int(answer.sum())} masked output "
                    f"patches, but ratio={self.ratio} and output_share={self.output_share} give {on_output}"
                )
            forced = torch.rand(batch_size, 1, generator=generator) < self.answer_prob
            noise_out = torch.where(forced & answer[out_idx][None], noise_out - 2.0, noise_out)
        noise_in = torch.rand(batch_size, len(in_idx), generator=generator)
        mask = torch.zeros(batch_size, length, dtype=torch.bool)
        mask[:, out_idx] = _lowest(noise_out, on_output)
        mask[:, in_idx] = _lowest(noise_in, on_input)
        return mask

    def __repr__(self) -> str:
        return (
            f"CanvasMasking(ratio={self.ratio}, output_share={self.output_share}, "
            f"answer_prob={self.answer_prob})"
        )


def _lowest(noise: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool, True at the ``count`` smallest entries of each row."""
    chosen = torch.zeros_like(noise, dtype=torch.bool)
    if count:
        chosen.scatter_(1, noise.argsort(dim=1)[:, :count], True)
    return chosen


def sobel_edges(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) [0, 1] -> (B, 3, H, W) grey Sobel gradient magnitude, scaled to [0, 1]."""
    grey = pixels.mean(1, keepdim=True)
    kx = grey.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).view(1, 1, 3, 3)
    padded = F.pad(grey, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx), F.conv2d(padded, kx.transpose(2, 3))
    magnitude = (gx.square() + gy.square()).sqrt() / 4.0  # a full 0-to-1 step gives 1
    return magnitude.clamp(0.0, 1.0).expand(-1, 3, -1, -1)


def foreground_of(labels: torch.Tensor, ignore_index: int | None, generator=None) -> torch.Tensor:
    """One class per sample, drawn among the non-background (>= 1), non-ignored classes of
    ``labels`` (B, H, W); class 0 when a sample holds none. Returns (B,) long."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    top = int(flat[flat != ignore_index].max()) + 1 if ignore_index is not None else int(flat.max()) + 1
    top = max(top, 2)
    present = torch.zeros(b, top, dtype=torch.bool, device=labels.device)
    valid = (flat >= 1) & (flat < top)
    present.scatter_(1, flat.clamp(0, top - 1) * valid, valid)
    present[:, 0] = False
    scores = torch.rand(b, top, generator=generator).to(labels.device).masked_fill(~present, -1.0)
    chosen = scores.argmax(1)
    return torch.where(present.any(1), chosen, torch.zeros_like(chosen))


def partners_holding(labels: torch.Tensor, classes: torch.Tensor, generator=None) -> torch.Tensor:
    """(B,) for each sample i another sample of the batch whose mask holds ``classes[i]`` (drawn at
    random), so a foreground episode has its class in both pairs as in Pascal-5i; i itself when
    no other sample holds it."""
    b = labels.shape[0]
    holds = (labels.reshape(b, 1, -1) == classes.view(1, b, 1)).any(-1)  # [j, i]: j holds class of i
    holds &= ~torch.eye(b, dtype=torch.bool, device=labels.device)
    scores = torch.rand(b, b, generator=generator).to(labels.device).masked_fill(~holds, -1.0)
    best = scores.argmax(0)
    return torch.where(holds.any(0), best, torch.arange(b, device=labels.device))


class PainterHead(nn.Module):
    """Painter's light decoder: the normed tokens of four encoder levels, concatenated, projected to
    ``decoder_dim`` channels per pixel of each patch, laid out as an image, then a 3x3 conv,
    LayerNorm, GELU and a 1x1 conv to RGB."""

    def __init__(self, embed_dim: int, levels: int, patch_size: int, decoder_dim: int, out_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(embed_dim * levels, patch_size**2 * decoder_dim)
        self.pred = nn.Sequential(
            nn.Conv2d(decoder_dim, decoder_dim, kernel_size=3, padding=1),
            LayerNorm2d(decoder_dim),
            nn.GELU(),
            nn.Conv2d(decoder_dim, out_chans, kernel_size=1),
        )

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """(B, rows * cols, levels * D) -> (B, out_chans, rows * p, cols * p).

        ``rows = (first, stop)`` paints only the token rows ``first..stop - 1``, (B, out_chans,
        (stop - first) * p, cols * p), exactly as the full painting's crop: the 3x3 conv's
        one-pixel border comes from the neighbouring token rows, of which only the pixel row
        touching the band is embedded.
        """
        b, p, d, (num_rows, cols) = tokens.shape[0], self.patch_size, self.decoder_dim, grid
        first, stop = rows if rows is not None else (0, num_rows)
        if not 0 <= first < stop <= num_rows:
            raise ValueError(f"rows {rows!r} must satisfy 0 <= first < stop <= {num_rows}")
        above, below = int(first > 0), int(stop < num_rows)  # a halo pixel row where a neighbour exists
        token_rows = tokens.view(b, num_rows, cols, -1)
        # laid out channels-last (N, H, W, C), viewed as NCHW: the convs and timm's LayerNorm2d
        # (which permutes to channels-last and back) then run without copies
        x = tokens.new_empty(b, (stop - first) * p + above + below, cols * p, d)
        pieces = [(first, stop, 0, p, above)]  # token rows, pixel rows of each patch, first row of x
        if above:
            pieces.append((first - 1, first, p - 1, p, 0))
        if below:
            pieces.append((stop, stop + 1, 0, 1, x.shape[1] - 1))
        for lo, hi, top, bottom, at in pieces:
            k, n = bottom - top, hi - lo
            # a contiguous 2-D input: a strided 4-D one ran as a batched matmul at half the speed
            band = token_rows[:, lo:hi].reshape(b * n * cols, -1)
            weight = self.embed.weight[top * p * d : bottom * p * d]  # output order: (row, column, channel)
            pixels = F.linear(band, weight, self.embed.bias[top * p * d : bottom * p * d])
            x[:, at : at + n * k].view(b, n, k, cols, p, d).copy_(
                pixels.view(b, n, cols, k, p, d).permute(0, 1, 3, 2, 4, 5)
            )
        x = self.pred(x.permute(0, 3, 1, 2))
        return x[:, :, above : above + (stop - first) * p]


@register_method("painter")
class Painter(MaskedImageModel):
    """In-context pretraining on 2x2 canvases of two (image, output) pairs of the same task.

    Args:
        encoder: the backbone (its ``img_size`` is the canvas side), trained and exported.
        mask_generator: :class:`CanvasMasking` by default.
        tasks: the output renderings drawn from, uniformly per canvas (:data:`TASKS`; null:
            :data:`DEFAULT_TASKS`).
        num_classes: classes of the batch's ``mask`` (the segmentation palette's size).
        ignore_index: the masks' ignore label (255 for voc:/ade20k:), painted grey.
        separator: half-width in pixels of the white cross between cells.
        mean, std: the input normalisation of the recipe (``data.mean`` / ``data.std``; null:
            ImageNet's), in which rendered outputs and separators are written like the images.
        merge_block: the block after which the image and output streams are averaged (null:
            Painter's 2, i.e. three blocks per stream, or the first tapped block if earlier).
        decoder_dim: channels per pixel of :class:`PainterHead` (Painter: 64).
        smooth_l1_beta: the loss's switch point from quadratic to linear (Painter: 0.01).
    """

    default_mask = {"type": "canvas", "ratio": 0.25, "output_share": 1.0, "answer_prob": 0.5}
    norm_pix_loss = False  # raw pixels: the prompting tool reads absolute colours

    def __init__(
        self,
        encoder: Backbone,
        mask_generator: MaskGenerator,
        tasks: list[str] | None = None,
        num_classes: int = 4,
        ignore_index: int | None = 255,
        separator: int = 1,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        merge_block: int | None = None,
        decoder_dim: int = 64,
        smooth_l1_beta: float = SMOOTH_L1_BETA,
    ):
        super().__init__(encoder, mask_generator)
        tasks = list(DEFAULT_TASKS if tasks is None else tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if not tasks or unknown:
            raise ValueError(f"painter tasks {unknown or tasks!r}: each must be one of {', '.join(TASKS)}")
        if encoder.in_chans != 3:
            raise ValueError(
                f"painter renders outputs in colour: the backbone needs in_chans=3, not {encoder.in_chans}"
            )
        side = encoder.patch_embed.img_size
        if side[0] != side[1]:
            raise ValueError(f"painter needs a square canvas, got img_size {tuple(side)}")
        cv.answer_patch_mask(encoder.grid_size)  # raises unless the grid splits into quadrants
        depth = len(encoder.blocks)
        # Painter taps the last block of each quarter of the encoder (ViT-L: 5, 11, 17, 23)
        self.levels = [max(0, k * depth // 4 - 1) for k in range(1, 5)]
        if merge_block is None:
            merge_block = min(2, min(self.levels))
        if not 0 <= merge_block <= min(self.levels):
            raise ValueError(
                f"merge_block={merge_block} must be in [0, {min(self.levels)}] for a {depth}-block encoder "
                f"(the streams merge before the first tapped block, {min(self.levels)})"
            )
        self.side = int(side[0])
        self.cell = cv.cell_size(self.side, separator)
        self.tasks = tasks
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.separator = separator
        self.normalization = Normalization(tuple(mean), tuple(std)) if mean is not None else Normalization()
        if (mean is None) != (std is None):
            raise ValueError("painter mean and std go together: give both or neither")
        self.palette = cv.Palette(num_classes)
        self.binary = cv.Palette(2, binary=True)
        self.smooth_l1_beta = smooth_l1_beta
        self.merge_block = merge_block
        self.patch_size = encoder.patch_size
        rows, cols = encoder.grid_size
        self.stream_grid = (rows, cols // 2)
        output = cv.output_half_mask(encoder.grid_size)
        # the same (row, column-within-half) patch of each stream, in row-major order
        self.register_buffer("image_idx", (~output).nonzero()[:, 0], persistent=False)
        self.register_buffer("output_idx", output.nonzero()[:, 0], persistent=False)
        dim = encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.segment_image = nn.Parameter(torch.zeros(1, 1, dim))
        self.segment_output = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = PainterHead(dim, len(self.levels), self.patch_size, decoder_dim)
        init_mae_weights(self)
        for token in (self.mask_token, self.segment_image, self.segment_output):
            nn.init.trunc_normal_(token, std=0.02)
        if encoder.cls_token is not None:
            encoder.cls_token.requires_grad_(False)  # the streams hold patch tokens only

    # ------------------------------------------------------------------ canvases

    def render_outputs(self, task: str, images: torch.Tensor, labels: torch.Tensor | None, fg=None):
        """The output image of ``task`` for cells ``images`` (B, 3, c, c), in input normalisation."""
        norm = self.normalization
        if task == "identity":
            return images
        if task == "edges":
            return cv.normalize(sobel_edges(cv.denormalize(images, norm)), norm)
        if labels is None:
            raise ValueError(
                f"painter task {task!r} needs the batch's 'mask': use a source with per-pixel labels "
                "(synthetic:textures?...&segmentation=1, synthetic:shapes, voc:, ade20k:) or tasks "
                "without masks (edges, identity)"
            )
        if task == "segmentation":
            return cv.normalize(self.palette.render(labels, self.ignore_index), norm)
        binary = (labels == fg[:, None, None]).long()
        if self.ignore_index is not None:
            binary = torch.where(labels == self.ignore_index, labels.new_tensor(self.ignore_index), binary)
        return cv.normalize(self.binary.render(binary, self.ignore_index), norm)

    def build_canvases(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, side, side) training canvases from ``batch`` (see the module docstring)."""
        images = batch["image"]
        b = images.shape[0]
        cells = cv.resize_images(images, self.cell)
        labels = batch.get("mask")
        if labels is not None:
            labels = cv.resize_labels(labels.long(), self.cell)
        partner = torch.roll(torch.arange(b, device=images.device), -1)
        task_ids = torch.randint(len(self.tasks), (b,), generator=generator).to(images.device)
        fg = None
        if labels is not None:
            fg = foreground_of(labels, self.ignore_index, generator)
            if "foreground" in self.tasks:
                is_fg = task_ids == self.tasks.index("foreground")
                partner = torch.where(is_fg, partners_holding(labels, fg, generator), partner)
        outputs = torch.empty_like(cells)
        partner_outputs = torch.empty_like(cells)
        for i, task in enumerate(self.tasks):
            rows = (task_ids == i).nonzero()[:, 0]
            if not len(rows):
                continue
            sel_labels = labels[rows] if labels is not None else None
            pl = labels[partner[rows]] if labels is not None else None
            f = fg[rows] if fg is not None else None
            outputs[rows] = self.render_outputs(task, cells[rows], sel_labels, f)
            partner_outputs[rows] = self.render_outputs(task, cells[partner[rows]], pl, f)
        quadrants = {
            "support_image": cells,
            "support_output": outputs,
            "query_image": cells[partner],
            "answer": partner_outputs,
        }
        return cv.stitch(quadrants, self.side, self.separator, cv.separator_value(self.normalization))

    # ------------------------------------------------------------------ model

    def encode(self, canvases: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Painter's two-stream encoder on a canvas: (B, 3, side, side), (B, L) -> (B, L / 2, 4 D).

        The left column (images) and the right column (outputs) are two streams of the same
        positions (the left column's) plus a learned segment token each; masked patches take
        the mask token (SimMIM-style, so the encoder sees every position). As in Painter, the
        streams hold patch tokens only, no cls token. The streams run through the first
        ``merge_block + 1`` blocks as one batch and are then averaged token by token, so from
        there each token holds an image patch and its output patch together. The final-normed
        tokens of the four tapped blocks are concatenated.
        """
        b = canvases.shape[0]
        tokens = self.encoder.patch_embed(canvases)  # (B, L, D), no positions yet
        w = mask[..., None].to(tokens.dtype)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        positions = self.encoder.pos_embed[:, self.encoder.num_prefix_tokens :][:, self.image_idx]
        images = tokens[:, self.image_idx] + self.segment_image + positions
        outputs = tokens[:, self.output_idx] + self.segment_output + positions
        # patch tokens only, as Painter's own model: a cls token would cost a token per stream
        x = self.encoder.ready_for_blocks(torch.cat([images, outputs], dim=0))

        def merge_after(i: int, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            h = block(h)
            return (h[:b] + h[b:]) * 0.5 if i == self.merge_block else h

        _, taps = self.encoder.run_blocks(x, merge_after, taps=tuple(self.levels))
        return torch.cat([self.encoder.norm(taps[i]) for i in self.levels], dim=-1)

    def predict_outputs(
        self, canvases: torch.Tensor, mask: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The painted output column (B, 3, side, side / 2) of ``canvases`` with ``mask`` hidden;
        with ``rows = (first, stop)`` only that band of token rows (see :class:`PainterHead`)."""
        return self.head(self.encode(canvases, mask), self.stream_grid, rows)

    def hidden_rows(self, mask: torch.Tensor) -> tuple[int, int] | None:
        """``(first, stop)``: the band of output-stream token rows holding every masked output
        patch of the batch (the answer quadrant: the bottom half); None when none is masked. Only
        these rows are painted (the head is 44% of a ViT-Ti/8 canvas forward's FLOPs)."""
        rows, cols = self.stream_grid
        masked = mask[:, self.output_idx].view(-1, rows, cols).any(dim=2).any(dim=0).nonzero()[:, 0]
        return (int(masked[0]), int(masked[-1]) + 1) if len(masked) else None

    def paint(self, canvases: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Canvases (B, 3, side, side) whose masked output patches are painted; the rest as given."""
        b, p, (rows, cols) = canvases.shape[0], self.patch_size, self.stream_grid
        painted = canvases.clone()
        band = self.hidden_rows(mask)
        if band is None:
            return painted
        first, stop = band
        pred = self.predict_outputs(canvases, mask, band)
        region = painted[:, :, first * p : stop * p, painted.shape[-1] - cols * p :]
        hidden = mask[:, self.output_idx].view(b, rows, cols)[:, first:stop]
        pixels = hidden.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
        region.copy_(torch.where(pixels[:, None], pred.to(region.dtype), region))
        return painted

    def forward(self, batch: dict, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Paint the masked output patches of canvases stitched from ``batch``.

        Args:
            batch: ``image`` (B, 3, side, side) and, for the mask-based tasks, ``mask`` (B, side, side).
            mask: optional (B, L) bool, True = masked; from the mask generator when not given.

        Returns:
            ``loss`` (scalar: smooth-L1 over the pixels of the masked output patches; hidden
            input patches are not predicted, as in Painter), ``canvas`` (B, 3, side, side),
            ``pred`` (B, L, p*p*3) (zeros except at masked output patches) and ``patch_mask``.
        """
        canvases = self.build_canvases(batch)
        if mask is None:
            mask = self.draw_mask(canvases.shape[0], canvases.device)
        rows, cols = self.stream_grid
        first, stop = self.hidden_rows(mask) or (0, rows)
        painted = patchify(self.predict_outputs(canvases, mask, (first, stop)), self.patch_size)
        output_idx = self.output_idx.view(rows, cols)[first:stop].reshape(-1)  # the painted patches
        target = patchify(canvases, self.patch_size)[:, output_idx]
        hidden = mask[:, output_idx]
        loss = F.smooth_l1_loss(painted[hidden].float(), target[hidden].float(), beta=self.smooth_l1_beta)
        full = torch.zeros(*mask.shape, painted.shape[-1], dtype=painted.dtype, device=painted.device)
        full[:, output_idx] = torch.where(hidden[..., None], painted.detach(), 0.0)
        return {"loss": loss, "canvas": canvases, "pred": full, "patch_mask": mask}
