"""Prompt canvases: four images on a 2x2 grid, and label maps rendered as colour images.

Layout (Bar et al., "Visual Prompting via Image Inpainting", NeurIPS 2022), at the backbone's
input size ``side``::

    +-----------+-----------+
    |  support  |  support  |   top-left: an example input, top-right: its output
    |   image   |   output  |
    +-----------+-----------+
    |   query   |  answer   |   bottom-left: the query, bottom-right: its output (masked and
    |   image   | (masked)  |   painted by the model at inference)
    +-----------+-----------+

Each quadrant is ``side / 2`` pixels; its cell, ``side / 2 - sep``, sits against the canvas edge,
so a separator cross ``2 * sep`` wide (white, as in Bar et al.'s 2 px cross at 224 px) runs along
the middle. The bottom-right quadrant's patches are exactly the masked answer when ``side / 2`` is
a multiple of the patch size; the separator strip inside it is masked with it.

Palette: class ``c`` of ``C`` takes point ``c`` (row-major, red slowest) of an ``n x n x n`` grid
of RGB levels ``linspace(0, 1, n)``, ``n`` the smallest even number with ``n^3 >= C``; binary
foreground is black background and white foreground (Bar et al.). Ignored pixels are painted mid
grey, which an even ``n`` never puts on the grid. Decoding snaps each pixel to the nearest palette
colour by L1 distance over RGB (Painter's default read-out); binary maps threshold the mean
intensity at 0.5. Painter's own ADE20K palette spreads 150 colours differently; any fixed,
well-separated map serves, since the model learns the colours from the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimkit.data.transforms import Normalization

QUADRANTS = ("support_image", "support_output", "query_image", "answer")
VOID_GREY = 0.5
SEPARATOR_VALUE = 1.0  # white, in [0, 1] pixel units


def cell_size(side: int, sep: int) -> int:
    """Pixels per side of one cell of a ``side`` canvas with separator half-width ``sep``."""
    if side % 2:
        raise ValueError(f"canvas side {side} must be even (two cells per side)")
    if sep < 0 or side // 2 - sep < 1:
        raise ValueError(f"separator {sep} must be in 0..{side // 2 - 1} for a {side} px canvas")
    return side // 2 - sep


def cell_offsets(side: int, sep: int) -> dict[str, tuple[int, int]]:
    """Top-left pixel (row, col) of each cell, keyed by :data:`QUADRANTS`."""
    far = side // 2 + sep
    return {
        "support_image": (0, 0),
        "support_output": (0, far),
        "query_image": (far, 0),
        "answer": (far, far),
    }


def stitch(cells: dict[str, torch.Tensor], side: int, sep: int, separator: torch.Tensor) -> torch.Tensor:
    """Four (B, C, cell, cell) tensors on one (B, C, side, side) canvas.

    ``separator`` (C,) is the value of the separator pixels (white in the canvas's normalisation);
    a missing cell (e.g. the answer at inference) is left at the separator value too.
    """
    cell = cell_size(side, sep)
    first = next(iter(cells.values()))
    b, c = first.shape[:2]
    canvas = separator.to(first).view(1, c, 1, 1).expand(b, c, side, side).clone()
    for name, (top, left) in cell_offsets(side, sep).items():
        if name in cells:
            x = cells[name]
            assert x.shape == (b, c, cell, cell), (name, tuple(x.shape))
            canvas[:, :, top : top + cell, left : left + cell] = x
    return canvas


def crop_cell(canvas: torch.Tensor, name: str, sep: int) -> torch.Tensor:
    """The (B, C, cell, cell) cell ``name`` of a canvas (B, C, side, side)."""
    side = canvas.shape[-1]
    cell = cell_size(side, sep)
    top, left = cell_offsets(side, sep)[name]
    return canvas[..., top : top + cell, left : left + cell]


def answer_patch_mask(grid_size: tuple[int, int]) -> torch.Tensor:
    """(rows * cols,) bool, True on the bottom-right quadrant's patches (row-major)."""
    rows, cols = grid_size
    if rows % 2 or cols % 2:
        raise ValueError(f"patch grid {rows}x{cols} must be even on both sides to split into quadrants")
    r = torch.arange(rows)[:, None] >= rows // 2
    c = torch.arange(cols)[None, :] >= cols // 2
    return (r & c).reshape(-1)


def output_half_mask(grid_size: tuple[int, int]) -> torch.Tensor:
    """(rows * cols,) bool, True on the right column of cells (the outputs), row-major."""
    rows, cols = grid_size
    return (torch.arange(cols)[None, :] >= cols // 2).expand(rows, cols).reshape(-1)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), bilinear with antialiasing."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_labels(labels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, H, W) integer maps resized with pixel-centre nearest neighbours (no label mixing)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if labels.shape[-2:] == size:
        return labels
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    return out[:, 0].to(labels.dtype)


def normalize(pixels: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """[0, 1] pixels (B, C, H, W) into ``norm``'s input space."""
    mean = pixels.new_tensor(norm.mean).view(1, -1, 1, 1)
    std = pixels.new_tensor(norm.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def denormalize(pixels: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1]."""
    mean = pixels.new_tensor(norm.mean).view(1, -1, 1, 1)
    std = pixels.new_tensor(norm.std).view(1, -1, 1, 1)
    return (pixels * std + mean).clamp(0.0, 1.0)


def separator_value(norm: Normalization) -> torch.Tensor:
    """White in ``norm``'s input space, (C,)."""
    return (SEPARATOR_VALUE - torch.tensor(norm.mean)) / torch.tensor(norm.std)


class Palette:
    """A fixed colour per class; see the module docstring.

    Args:
        num_classes: classes 0..C-1 (2 with ``binary``).
        binary: black background (0), white foreground (1), decoded by thresholding.
    """

    def __init__(self, num_classes: int, binary: bool = False):
        if binary and num_classes != 2:
            raise ValueError(f"a binary palette has 2 classes, got {num_classes}")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be positive")
        self.num_classes = num_classes
        self.binary = binary
        if binary:
            self.colors = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
        else:
            n = 2
            while n**3 < num_classes:
                n += 2
            levels = torch.linspace(0.0, 1.0, n)
            grid = torch.cartesian_prod(levels, levels, levels)
            self.colors = grid[:num_classes].contiguous()

    def render(self, labels: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
        """(B, H, W) class ids -> (B, 3, H, W) colours in [0, 1]; ignored pixels mid grey."""
        labels = labels.long()
        ignored = labels == ignore_index if ignore_index is not None else torch.zeros_like(labels, dtype=bool)
        bad = ~ignored & ((labels < 0) | (labels >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"label {int(labels[bad][0])} is outside 0..{self.num_classes - 1} and is not the ignore "
                f"label {ignore_index}"
            )
        colors = self.colors.to(labels.device)
        out = colors[labels.clamp(0, self.num_classes - 1)]  # (B, H, W, 3)
        out[ignored] = VOID_GREY
        return out.permute(0, 3, 1, 2).contiguous()

    def decode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) colours in [0, 1] -> (B, H, W) class ids (nearest colour, L1; binary: threshold)."""
        if self.binary:
            return (pixels.mean(1) > 0.5).long()
        # one colour at a time, keeping the nearest so far (the first on ties, as argmin): a third of
        # the time of one (B, H, W, C, 3) difference, in a (B, H, W) working set
        nearest = ids = None
        for k, color in enumerate(self.colors.to(pixels)):
            dist = (pixels - color.view(1, -1, 1, 1)).abs().sum(1)
            if nearest is None:
                nearest, ids = dist, torch.zeros_like(dist, dtype=torch.long)
                continue
            ids.masked_fill_(dist < nearest, k)
            nearest = torch.minimum(dist, nearest)
        return ids
