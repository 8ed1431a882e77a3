"""ColorMAE masks: spectral character, exact counts, crops, ties, schedule, bank files, errors."""

import numpy as np
import pytest
import torch

from mimkit.ssl import build_method, masking
from mimkit.ssl.colornoise import (
    COLORS,
    ColorNoiseMasking,
    load_bank,
    make_bank,
    radial_power_spectrum,
    save_bank,
)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _colornoise(**options):
    return masking.build({"type": "colornoise", "bank_size": 16, **options})


def _band(freqs, power, low, high):
    return power[(freqs >= low) & (freqs <= high)]


def _mean_frequency(masks):
    """Spectrum-weighted mean spatial frequency (cycles/patch) of (N, rows, cols) bool masks."""
    x = masks.float()
    freqs, power = radial_power_spectrum(x - x.mean((1, 2), keepdim=True))
    return float((freqs * power).sum() / power.sum())


@pytest.fixture(scope="module")
def noise_spectra():
    return {c: radial_power_spectrum(make_bank(c, (64, 64), num_fields=32, seed=0)) for c in COLORS}


@pytest.fixture(scope="module")
def mask_stacks():
    return {
        c: ColorNoiseMasking(color=c, bank_size=64)(512, (14, 14), generator=_generator(0)).view(-1, 14, 14)
        for c in COLORS
    }


def test_fields_are_standardised_and_colours_share_the_white_noise():
    fields = {c: make_bank(c, (32, 48), num_fields=4, seed=3) for c in COLORS}
    for f in fields.values():
        assert f.shape == (4, 32, 48) and f.dtype == torch.float32
        torch.testing.assert_close(f.mean((1, 2)), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(f.std((1, 2)), torch.ones(4), atol=1e-5, rtol=0)
    assert not torch.allclose(fields["red"], fields["blue"])  # one white noise, filtered apart
    torch.testing.assert_close(make_bank("green", (32, 48), num_fields=4, seed=3), fields["green"])


def test_noise_spectra_peak_where_each_colour_should(noise_spectra):
    freqs, red = noise_spectra["red"]
    peak = lambda power: float(freqs[power.argmax()])  # noqa: E731
    assert peak(red) <= 0.06
    assert _band(freqs, red, 0.4, 0.5).max() < 1e-3 * red.max()

    _, blue = noise_spectra["blue"]
    assert peak(blue) >= 0.45
    assert _band(freqs, blue, 0.01, 0.1).max() < 0.05 * blue.max()

    _, green = noise_spectra["green"]
    assert 0.2 <= peak(green) <= 0.3
    assert _band(freqs, green, 0.01, 0.06).max() < 0.1 * green.max()
    assert _band(freqs, green, 0.45, 0.5).max() < 0.3 * green.max()

    _, purple = noise_spectra["purple"]
    low, mid, high = (_band(freqs, purple, a, b) for a, b in ((0.01, 0.1), (0.2, 0.3), (0.4, 0.5)))
    assert float(freqs[1:][purple[1:].argmax()]) <= 0.06  # the strongest end is the low one
    assert mid.min() < 1e-3 * min(low.max(), high.max())  # a notch where green peaks
    assert high.max() > 10 * mid.mean()


def test_binary_masks_keep_the_spectral_ordering(mask_stacks):
    mean = {c: _mean_frequency(m) for c, m in mask_stacks.items()}
    assert mean["red"] < mean["green"] < mean["blue"], mean
    freqs, green = radial_power_spectrum(mask_stacks["green"].float() - 0.75)
    assert 0.15 <= float(freqs[1:][green[1:].argmax()]) <= 0.35
    _, purple = radial_power_spectrum(mask_stacks["purple"].float() - 0.75)
    assert purple[3:5].max() < min(purple[1], purple[-1])  # the dip survives thresholding


@pytest.mark.parametrize("crop", ["per_sample", "shared"])
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(14, 14), (7, 7), (6, 10)])
def test_exact_masked_count_per_sample(crop, ratio, grid):
    mask = _colornoise(ratio=ratio, crop=crop)(24, grid, generator=_generator(0))
    length = grid[0] * grid[1]
    assert mask.dtype == torch.bool and mask.shape == (24, length)
    assert (mask.sum(1) == masking.num_masked(length, ratio)).all()


@pytest.mark.parametrize("color", COLORS)
def test_visible_patches_are_the_highest_values_of_the_window(color):
    gen = _colornoise(color=color, ratio=0.6)
    mask = gen(32, (8, 8), generator=_generator(4))
    values = gen.windows(32, (8, 8), generator=_generator(4)).flatten(1)
    visible_min = values.masked_fill(mask, float("inf")).min(1).values
    masked_max = values.masked_fill(~mask, float("-inf")).max(1).values
    assert (visible_min > masked_max).all()


def test_windows_cover_every_offset_and_both_flips(tmp_path):
    height, width, rows, cols = 7, 9, 3, 4
    ramp = torch.arange(height * width, dtype=torch.float32).view(1, height, width)
    gen = masking.build({"type": "colornoise", "bank": str(save_bank(tmp_path / "ramp.pt", {"green": ramp}))})
    win = gen.windows(2000, (rows, cols), generator=_generator(0))
    corner = win.amin((1, 2)).long()  # top-left value of the unflipped window
    expected = (corner[:, None, None] + torch.arange(rows)[:, None] * width + torch.arange(cols)).float()
    flip_v, flip_h = win[:, 0, 0] > win[:, -1, 0], win[:, 0, 0] > win[:, 0, -1]
    unflipped = torch.where(flip_v[:, None, None], win.flip(1), win)
    unflipped = torch.where(flip_h[:, None, None], unflipped.flip(2), unflipped)
    assert torch.equal(unflipped, expected)  # each window is one contiguous block of the field
    assert len(corner.unique()) == (height - rows + 1) * (width - cols + 1)
    for v in (False, True):
        for h in (False, True):
            assert 0.2 < float(((flip_v == v) & (flip_h == h)).float().mean()) < 0.3


def test_same_seed_same_masks_and_each_seed_matters():
    a = _colornoise()(16, (14, 14), generator=_generator(1))
    assert torch.equal(a, _colornoise()(16, (14, 14), generator=_generator(1)))
    assert not torch.equal(a, _colornoise()(16, (14, 14), generator=_generator(2)))
    assert not torch.equal(a, _colornoise(seed=5)(16, (14, 14), generator=_generator(1)))


def test_per_sample_crops_differ_within_a_batch():
    mask = _colornoise()(64, (14, 14), generator=_generator(0))
    assert len(torch.unique(mask, dim=0)) == 64


def test_same_field_everywhere_gives_one_mask_per_batch_only_with_shared_crops(tmp_path):
    path = save_bank(tmp_path / "same.pt", {"green": make_bank("green", (40, 40), 1).expand(8, -1, -1)})
    shared = masking.build({"type": "colornoise", "bank": str(path), "crop": "shared"})
    mask = shared(20, (14, 14), generator=_generator(0))  # more samples than fields: several passes
    assert len(torch.unique(mask[:8], dim=0)) == 1
    per_sample = masking.build({"type": "colornoise", "bank": str(path)})
    assert len(torch.unique(per_sample(20, (14, 14), generator=_generator(0)), dim=0)) > 15


def _all_windows(field, grid):
    """(4 * offsets, rows, cols) every flipped window of one (H, W) field."""
    rows, cols = grid
    win = field.unfold(0, rows, 1).unfold(1, cols, 1).reshape(-1, rows, cols)
    return torch.cat([win, win.flip(1), win.flip(2), win.flip(1, 2)])


def test_shared_crops_take_slices_in_order_under_one_window_per_pass():
    gen = _colornoise(crop="shared", bank_size=6, field_scale=3)
    grid, keep = (5, 5), 25 - masking.num_masked(25, 0.75)
    mask = gen(15, grid, generator=_generator(7))  # passes over slices 0-5, 0-5, 0-2
    fields = gen.bank("green", grid)

    def candidates(i):  # every window's mask for slice i, in one fixed window order
        values = _all_windows(fields[i], grid).flatten(1)
        order = values.sort(dim=1, descending=True, stable=True).indices
        return torch.ones_like(values, dtype=torch.bool).scatter_(1, order[:, :keep], False)

    for start in (0, 6, 12):
        samples = range(start, min(start + 6, 15))
        hits = [(candidates(i % 6) == mask[i]).all(1) for i in samples]
        assert bool(torch.stack(hits).all(0).any()), f"no single window explains pass {start}"


def test_ties_go_to_the_lowest_patch_index(tmp_path):
    path = save_bank(tmp_path / "flat.npz", {"blue": torch.zeros(3, 9, 9)})
    mask = masking.build({"type": "colornoise", "color": "blue", "bank": str(path)})(5, (4, 4))
    expected = torch.ones(16, dtype=torch.bool)
    expected[:4] = False  # 16 - 12 = 4 visible: patches 0..3
    assert torch.equal(mask, expected.expand(5, -1))


def test_colour_schedule_switches_at_its_epochs():
    gen = _colornoise(schedule={200: "blue", "250": "red", 275: "purple"})
    seen = {}
    for epoch in (0, 199, 200, 249, 250, 274, 275, 799, 10):
        gen.set_epoch(epoch)
        seen[epoch] = gen.color
    assert seen == {
        0: "green",
        199: "green",
        200: "blue",
        249: "blue",
        250: "red",
        274: "red",
        275: "purple",
        799: "purple",
        10: "green",
    }
    gen.set_epoch(250)
    red = _colornoise(color="red")
    assert torch.equal(gen(8, (14, 14), generator=_generator(3)), red(8, (14, 14), generator=_generator(3)))


def test_method_forwards_set_epoch_to_its_mask_generator():
    method = build_method(
        {
            "name": "mae",
            "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 1},
            "decoder_dim": 32,
            "decoder_depth": 1,
            "decoder_heads": 2,
            "mask": {"type": "colornoise", "color": "green", "ratio": 0.75, "schedule": {2: "blue"}},
        }
    )
    out = method({"image": torch.randn(2, 3, 32, 32)})
    assert out["patch_mask"].sum(1).tolist() == [12, 12] and torch.isfinite(out["loss"])
    method.set_epoch(2)
    assert method.mask_generator.color == "blue"
    masking.build({"type": "random", "ratio": 0.5}).set_epoch(3)  # the base class hook is a no-op


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_saved_bank_gives_the_same_masks(tmp_path, suffix):
    made = _colornoise(schedule={1: "purple"})
    grid = (6, 10)
    path = save_bank(tmp_path / f"bank{suffix}", {c: made.bank(c, grid) for c in ("green", "purple")})
    loaded = masking.build({"type": "colornoise", "bank": str(path), "schedule": {1: "purple"}})
    for epoch in (0, 1):
        made.set_epoch(epoch)
        loaded.set_epoch(epoch)
        expected = made(12, grid, generator=_generator(epoch))
        assert torch.equal(loaded(12, grid, generator=_generator(epoch)), expected)
    assert not list(tmp_path.glob(".*tmp*"))


def test_an_unnamed_stack_loads_as_the_configured_colour(tmp_path):
    stack = np.random.default_rng(0).random((4, 20, 20)).astype(np.float32)  # like the official files
    np.savez(tmp_path / "green_noise_data_4.npz", stack)
    banks = load_bank(tmp_path / "green_noise_data_4.npz", color="green")
    torch.testing.assert_close(banks["green"], torch.from_numpy(stack))
    gen = masking.build({"type": "colornoise", "bank": str(tmp_path / "green_noise_data_4.npz")})
    assert (gen(3, (14, 14)).sum(1) == 147).all()


def test_bank_file_errors_name_the_problem(tmp_path):
    path = save_bank(tmp_path / "b.pt", {"green": make_bank("green", (10, 10), 2)})
    with pytest.raises(ValueError, match="lacks colour.*blue"):
        masking.build({"type": "colornoise", "bank": str(path), "schedule": {5: "blue"}})
    with pytest.raises(ValueError, match=r"\(10, 10\), smaller than the grid \(14, 14\)"):
        masking.build({"type": "colornoise", "bank": str(path)})(2, (14, 14))
    with pytest.raises(ValueError, match="b.txt.*must end in .pt or .npz"):
        save_bank(tmp_path / "b.txt", {"green": torch.zeros(1, 4, 4)})
    with pytest.raises(ValueError, match="'teal'"):
        save_bank(tmp_path / "c.pt", {"teal": torch.zeros(1, 4, 4)})


@pytest.mark.parametrize(
    "options, message",
    [
        ({"color": "magenta"}, r"'magenta'; valid: red, green, blue, purple"),
        ({"crop": "diagonal"}, r"'diagonal'; valid: per_sample, shared"),
        ({"schedule": {200: "cyan"}}, r"'cyan'; valid: red, green, blue, purple"),
        ({"schedule": {"late": "blue"}}, r"'late'"),
        ({"schedule": {-5: "blue"}}, r"-5"),
        ({"sigma_fine": 2.0}, r"sigma_fine < sigma_coarse, got 2.0 and 1.2"),
        ({"bank_size": 0}, r"bank_size.*0"),
        ({"ratio": 1.5}, r"1.5"),
        ({"colour": "green"}, r"unknown key colour \(did you mean color\?\)"),
    ],
)
def test_bad_options_are_errors_that_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        masking.build({"type": "colornoise", **options})
