"""ColorMAE's data-independent masks: Hinojosa, Liu, Ghanem, "ColorMAE: Exploring
data-independent masking strategies in Masked AutoEncoders" (ECCV 2024).

A mask is a thresholded window of filtered random noise. White noise is filtered into one of
four colours, each field normalised to zero mean and unit variance:

- ``red``: low-pass, ``G(sigma_coarse) * W``; large blobs.
- ``blue``: high-pass, ``W - G(sigma_fine) * W``; scattered single patches.
- ``green``: band-pass, ``G(sigma_fine) * W - G(sigma_coarse) * W`` (a difference of Gaussians);
  clusters of a few patches at a regular spacing. The paper's best colour and the default.
- ``purple``: band-stop, ``W`` minus its band-pass part, the band-pass scaled to unit gain at its
  centre frequency so the stop band reaches zero there; big blobs and single patches together.

The official code ships only pre-computed pattern files; here the patterns are generated from a
seed. A bank of ``bank_size`` fields, each ``field_scale`` times the patch grid on a side, is made
once per grid size (lazily, on the first call) or loaded from a file written by
:func:`save_bank` (the official ``.npz`` stacks load too). Each sample's mask is a random
grid-sized window of a random field, flipped at random horizontally and vertically, whose
highest values stay visible: exactly ``num_masked(L, ratio)`` patches are masked, as in random
masking.

Filtering is periodic (FFT) with the Gaussian's transfer function ``exp(-2 pi^2 sigma^2 f^2)``;
sigmas are in patches and frequencies in cycles per patch (the grid's Nyquist frequency is 0.5),
so a pattern keeps its character at any grid size. The defaults ``sigma_fine=0.6`` and
``sigma_coarse=1.2`` centre the green band at ~0.255 cycles/patch (a period of about 4 patches),
the middle of what a patch grid can represent; a sigma ratio of 2 makes the band about an octave
wide. Red keeps what lies below the band (half power at ~0.11 cycles/patch), blue what lies above
it (half power at ~0.42). The released code holds only the pattern files, not the sigmas that
made them, so these are mimkit's choice.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from mimkit.files import atomic_write
from mimkit.ssl.masking import MaskGenerator, num_masked, register_mask

COLORS = ("red", "green", "blue", "purple")
CROPS = ("per_sample", "shared")


def check_color(color: str) -> str:
    if color not in COLORS:
        raise ValueError(f"unknown noise colour {color!r}; valid: {', '.join(COLORS)}")
    return color


def _gaussian_gain(freq2: torch.Tensor, sigma: float) -> torch.Tensor:
    """Transfer function of a Gaussian blur of ``sigma`` patches at squared frequency ``freq2``."""
    return torch.exp(-2 * math.pi**2 * sigma**2 * freq2)


def _band_peak_gain(sigma_fine: float, sigma_coarse: float) -> float:
    """Largest gain of ``G(fine) - G(coarse)`` over all frequencies (closed form)."""
    a, b = 2 * math.pi**2 * sigma_fine**2, 2 * math.pi**2 * sigma_coarse**2
    freq2 = math.log(b / a) / (b - a)
    return math.exp(-a * freq2) - math.exp(-b * freq2)


def filter_noise(
    white: torch.Tensor, color: str, sigma_fine: float = 0.6, sigma_coarse: float = 1.2
) -> torch.Tensor:
    """Filter white noise (..., H, W) into ``color``; each field to zero mean, unit variance.

    Periodic boundaries (the filter is applied in the Fourier domain), so any window of the
    result has the same statistics. Returns float32 of the input's shape.
    """
    check_color(color)
    height, width = white.shape[-2:]
    fy = torch.fft.fftfreq(height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, dtype=torch.float64)
    freq2 = fy[:, None] ** 2 + fx[None, :] ** 2
    fine, coarse = _gaussian_gain(freq2, sigma_fine), _gaussian_gain(freq2, sigma_coarse)
    band = (fine - coarse) / _band_peak_gain(sigma_fine, sigma_coarse)
    gain = {"red": coarse, "blue": 1 - fine, "green": band, "purple": 1 - band}[color]
    out = torch.fft.ifft2(torch.fft.fft2(white.double()) * gain).real
    out = out - out.mean(dim=(-2, -1), keepdim=True)
    out = out / out.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return out.float()


def make_bank(
    color: str,
    field_size: tuple[int, int],
    num_fields: int = 256,
    sigma_fine: float = 0.6,
    sigma_coarse: float = 1.2,
    seed: int = 0,
) -> torch.Tensor:
    """(num_fields, H, W) fields of ``color`` noise; the same seed gives the same white noise
    for every colour, so the colours of one seed are filtered versions of one another."""
    generator = torch.Generator().manual_seed(seed)
    white = torch.randn(num_fields, *field_size, generator=generator, dtype=torch.float64)
    return filter_noise(white, color, sigma_fine, sigma_coarse)


def save_bank(path: str | os.PathLike, banks: dict[str, torch.Tensor]) -> Path:
    """Write ``{colour: (N, H, W) fields}`` to a ``.pt`` or ``.npz`` file (temporary name, then rename)."""
    path = Path(path)
    for color, fields in banks.items():
        check_color(color)
        if fields.dim() != 3:
            raise ValueError(f"bank {color!r} must be (N, H, W), got shape {tuple(fields.shape)}")
    arrays = {c: f.detach().float().cpu().contiguous() for c, f in banks.items()}
    if path.suffix == ".pt":
        return atomic_write(path, lambda tmp: torch.save(arrays, tmp))
    if path.suffix == ".npz":
        return atomic_write(path, lambda tmp: np.savez(tmp, **{c: a.numpy() for c, a in arrays.items()}))
    raise ValueError(f"bank file {str(path)!r} must end in .pt or .npz")


def load_bank(path: str | os.PathLike, color: str | None = None) -> dict[str, torch.Tensor]:
    """Read ``{colour: (N, H, W) float32 fields}`` from a ``.pt`` or ``.npz`` file.

    A file holding a single array not named after a colour (the official ColorMAE
    ``*_noise_data_*.npz`` stacks) is taken as the bank of ``color``.
    """
    path = Path(path)
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        data = data if isinstance(data, dict) else {"": data}
    elif path.suffix == ".npz":
        with np.load(path) as npz:
            data = {k: torch.from_numpy(npz[k]) for k in npz.files}
    else:
        raise ValueError(f"bank file {str(path)!r} must end in .pt or .npz")
    if len(data) == 1 and next(iter(data)) not in COLORS:
        if color is None:
            raise ValueError(f"{path} holds one unnamed bank; say which colour it is")
        data = {check_color(color): next(iter(data.values()))}
    banks = {}
    for key, fields in data.items():
        check_color(key)
        fields = torch.as_tensor(fields).float()
        if fields.dim() == 2:
            fields = fields[None]
        if fields.dim() != 3 or not bool(torch.isfinite(fields).all()):
            shape = tuple(fields.shape)
            raise ValueError(f"bank {key!r} in {path} must be finite (N, H, W), got shape {shape}")
        banks[key] = fields
    return banks


def radial_power_spectrum(fields: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged power spectrum of (..., H, W) fields, averaged over the leading dims.

    Power is ``|FFT|^2 / (H W)`` (white noise of unit variance gives 1 everywhere), averaged
    over rings one frequency step wide; the mean is not removed (it lands in bin 0).

    Returns:
        ``freqs`` (K,) in cycles per patch, ``0, 1/n, ..., (n // 2) / n`` with ``n = min(H, W)``,
        and ``power`` (K,) the mean power in each ring.
    """
    height, width = fields.shape[-2:]
    x = fields.reshape(-1, height, width).double()
    power = torch.fft.fft2(x).abs().square().mean(0) / (height * width)
    fy, fx = torch.fft.fftfreq(height, dtype=torch.float64), torch.fft.fftfreq(width, dtype=torch.float64)
    n = min(height, width)
    ring = torch.round((fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() * n).long().flatten()
    bins = n // 2 + 1
    inside = ring < bins
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, ring[inside], power.flatten()[inside])
    count = torch.bincount(ring[inside], minlength=bins).double()
    return torch.arange(bins, dtype=torch.float64) / n, total / count


def _parse_schedule(schedule: dict | None) -> list[tuple[int, str]]:
    steps = []
    for epoch, color in (schedule or {}).items():
        try:
            start = int(epoch)
        except (TypeError, ValueError):
            raise ValueError(f"colour schedule key {epoch!r} is not an epoch number") from None
        if start < 0 or str(start) != str(epoch).strip():
            raise ValueError(f"colour schedule key {epoch!r} must be a non-negative integer epoch")
        steps.append((start, check_color(color)))
    return sorted(steps)


@register_mask("colornoise")
class ColorNoiseMasking(MaskGenerator):
    """ColorMAE's filtered-noise masks (Hinojosa et al. 2024); see the module docstring.

    Args:
        ratio: fraction of patches masked (paper: 0.75).
        color: ``green`` (paper's best), ``red``, ``blue`` or ``purple``.
        crop: ``per_sample`` (default) draws a field, window and flips for every sample;
            ``shared`` follows the official code, which applies one crop and one pair of flips
            to its whole pattern stack per call and takes slices ``0..B-1`` in order (cycling,
            with a new crop per pass, when the batch is larger than the bank). With a bank at
            least as large as the batch every step then sees the same B slices under one
            shared offset, so a batch holds one random draw instead of B, and the rest of the
            bank is never used; per-sample crops make the samples independent.
        schedule: ``{epoch: colour}``: from that epoch on (see :meth:`set_epoch`) use that
            colour, e.g. ``{200: blue, 250: red, 275: purple}`` as the official configs allow.
        sigma_fine, sigma_coarse: Gaussian filter scales in patches (see the module docstring).
        bank_size: fields generated per grid size.
        field_scale: side of a generated field, in multiples of the patch grid's side.
        seed: seeds the generated bank; the crops come from the ``generator`` of each call.
        bank: a ``.pt``/``.npz`` file of fields (from :func:`save_bank`) used instead of
            generating them; it must hold every colour the generator can use.

    Masks are (B, rows*cols) bool, True = masked, row-major. Ties in the noise (possible only
    in a loaded bank) go deterministically to the lower row-major patch index of the output
    window: the ranking is a stable descending sort.
    """

    def __init__(
        self,
        ratio: float = 0.75,
        color: str = "green",
        crop: str = "per_sample",
        schedule: dict[int, str] | None = None,
        sigma_fine: float = 0.6,
        sigma_coarse: float = 1.2,
        bank_size: int = 256,
        field_scale: int = 4,
        seed: int = 0,
        bank: str | None = None,
    ):
        super().__init__(ratio)
        self.base_color = check_color(color)
        self.color = self.base_color
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; valid: {', '.join(CROPS)}")
        self.crop = crop
        self.schedule = _parse_schedule(schedule)
        if not 0 < sigma_fine < sigma_coarse:
            raise ValueError(f"need 0 < sigma_fine < sigma_coarse, got {sigma_fine} and {sigma_coarse}")
        self.sigma_fine, self.sigma_coarse = float(sigma_fine), float(sigma_coarse)
        if not isinstance(bank_size, int) or bank_size < 1:
            raise ValueError(f"bank_size must be a positive integer, got {bank_size!r}")
        if not isinstance(field_scale, int) or field_scale < 1:
            raise ValueError(f"field_scale must be a positive integer, got {field_scale!r}")
        self.bank_size, self.field_scale, self.seed = bank_size, field_scale, seed
        self.bank_path = bank
        self._loaded = load_bank(bank, color=self.base_color) if bank is not None else None
        if self._loaded is not None:
            needed = {self.base_color} | {c for _, c in self.schedule}
            missing = sorted(needed - set(self._loaded))
            if missing:
                raise ValueError(
                    f"bank file {bank} lacks colour(s) {', '.join(missing)}; "
                    f"it holds {', '.join(self._loaded)}"
                )
        self._cache: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """Switch to the colour the schedule names for ``epoch`` (the base colour before the first)."""
        self.color = self.base_color
        for start, color in self.schedule:
            if epoch >= start:
                self.color = color

    def bank(self, color: str, grid_size: tuple[int, int]) -> torch.Tensor:
        """The (N, H, W) fields of ``color`` used for ``grid_size``: loaded, or made once and cached."""
        check_color(color)
        rows, cols = grid_size
        if self._loaded is not None:
            if color not in self._loaded:
                raise ValueError(f"bank file {self.bank_path} holds no {color!r} fields")
            fields = self._loaded[color]
            if fields.shape[1] < rows or fields.shape[2] < cols:
                raise ValueError(
                    f"fields of {self.bank_path} are {tuple(fields.shape[1:])}, "
                    f"smaller than the grid {tuple(grid_size)}"
                )
            return fields
        key = (color, (rows, cols))
        if key not in self._cache:
            size = (rows * self.field_scale, cols * self.field_scale)
            self._cache[key] = make_bank(
                color, size, self.bank_size, self.sigma_fine, self.sigma_coarse, self.seed
            )
        return self._cache[key]

    def windows(
        self, batch_size: int, grid_size: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, rows, cols) noise windows: a field, an offset and two flips per sample (or per pass)."""
        fields = self.bank(self.color, grid_size)
        num, height, width = fields.shape
        rows, cols = grid_size
        if self.crop == "per_sample":
            draws = batch_size
            index = torch.randint(num, (batch_size,), generator=generator)
        else:  # one crop and flip per pass over the bank, slices in order
            draws = math.ceil(batch_size / num)
            index = torch.arange(batch_size) % num
        top = torch.randint(height - rows + 1, (draws,), generator=generator)
        left = torch.randint(width - cols + 1, (draws,), generator=generator)
        flip = torch.rand(draws, 2, generator=generator) < 0.5
        if self.crop == "shared":
            top, left, flip = (t.repeat_interleave(num, dim=0)[:batch_size] for t in (top, left, flip))
        r, c = torch.arange(rows), torch.arange(cols)
        r = torch.where(flip[:, :1], rows - 1 - r, r) + top[:, None]  # (B, rows), vertical flip
        c = torch.where(flip[:, 1:], cols - 1 - c, c) + left[:, None]  # (B, cols), horizontal flip
        return fields[index[:, None, None], r[:, :, None], c[:, None, :]]

    def sample(self, batch_size, grid_size, generator):
        values = self.windows(batch_size, grid_size, generator).flatten(1)
        length = values.shape[1]
        keep = length - num_masked(length, self.ratio)
        order = values.sort(dim=1, descending=True, stable=True).indices
        mask = torch.ones(batch_size, length, dtype=torch.bool)
        mask.scatter_(1, order[:, :keep], False)
        return mask

    def __repr__(self) -> str:
        schedule = f", schedule={dict(self.schedule)}" if self.schedule else ""
        return f"ColorNoiseMasking(ratio={self.ratio}, color={self.color!r}, crop={self.crop!r}{schedule})"
