"""Mask generators: exact counts, reproducibility, block connectivity, errors."""

import pytest
import torch

from mimkit.ssl import masking


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["random", "block"])
@pytest.mark.parametrize("ratio", [0.1, 0.4, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (6, 10)])
def test_exact_masked_count_per_sample(kind, ratio, grid):
    gen = masking.build({"type": kind, "ratio": ratio})
    mask = gen(16, grid, generator=_generator(0))
    length = grid[0] * grid[1]
    assert mask.dtype == torch.bool and mask.shape == (16, length)
    assert (mask.sum(1) == length - int(length * (1 - ratio))).all()


@pytest.mark.parametrize("kind", ["random", "block"])
def test_same_seed_same_mask_different_seed_different_mask(kind):
    gen = masking.build({"type": kind, "ratio": 0.5})
    a = gen(8, (14, 14), generator=_generator(1))
    b = gen(8, (14, 14), generator=_generator(1))
    c = gen(8, (14, 14), generator=_generator(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_random_masking_matches_mae_argsort_rule():
    gen = masking.build({"type": "random", "ratio": 0.75})
    mask = gen(4, (4, 4), generator=_generator(3))
    noise = torch.rand(4, 16, generator=_generator(3))
    keep = noise.argsort(dim=1)[:, :4]  # the 4 smallest noise values stay visible
    expected = torch.ones(4, 16, dtype=torch.bool)
    expected.scatter_(1, keep, False)
    assert torch.equal(mask, expected)


def _components(grid_mask):
    """4-connected components of a 2D bool mask, as a list of sizes."""
    rows, cols = grid_mask.shape
    seen, sizes = set(), []
    for r in range(rows):
        for c in range(cols):
            if grid_mask[r, c] and (r, c) not in seen:
                stack, size = [(r, c)], 0
                seen.add((r, c))
                while stack:
                    y, x = stack.pop()
                    size += 1
                    for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                        if 0 <= ny < rows and 0 <= nx < cols and grid_mask[ny, nx] and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            stack.append((ny, nx))
                sizes.append(size)
    return sizes


def test_block_masks_form_connected_blocks_unlike_random_ones():
    block = masking.build({"type": "block", "ratio": 0.4, "min_num_patches": 16})
    random = masking.build({"type": "random", "ratio": 0.4})
    block_masks = block(32, (14, 14), generator=_generator(4)).view(32, 14, 14)
    random_masks = random(32, (14, 14), generator=_generator(4)).view(32, 14, 14)
    block_components = [_components(m) for m in block_masks]
    random_components = [_components(m) for m in random_masks]
    # 78 masked patches in blocks of >= ~16: a handful of components, most patches in big ones
    assert max(len(c) for c in block_components) <= 8
    assert sum(max(c) for c in block_components) / 32 >= 16
    assert min(len(c) for c in random_components) > max(len(c) for c in block_components)


def test_block_mask_rectangles_respect_aspect_bounds_on_average():
    block = masking.build({"type": "block", "ratio": 0.1, "min_num_patches": 16, "min_aspect": 0.3})
    masks = block(32, (14, 14), generator=_generator(5)).view(32, 14, 14)
    for m in masks:
        rows = m.any(1).nonzero()
        cols = m.any(0).nonzero()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        # one block of ~19 patches (plus growth) stays within a 0.3..3.3 aspect box, loosely
        assert 0.2 <= float(height) / float(width) <= 5


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5, "half"])
def test_ratio_outside_open_interval_is_an_error_naming_it(ratio):
    with pytest.raises(ValueError, match=f"ratio.*{ratio}"):
        masking.build({"type": "random", "ratio": ratio})


def test_unknown_mask_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="checkerboard.*block.*random"):
        masking.build({"type": "checkerboard", "ratio": 0.5})


def test_unknown_option_names_it():
    with pytest.raises(ValueError, match="sigma"):
        masking.build({"type": "random", "ratio": 0.5, "sigma": 2})


def test_a_third_kind_plugs_in_through_the_registry():
    @masking.register_mask("first_k_test")
    class FirstK(masking.MaskGenerator):
        def sample(self, batch_size, grid_size, generator):
            length = grid_size[0] * grid_size[1]
            mask = torch.zeros(batch_size, length, dtype=torch.bool)
            mask[:, : masking.num_masked(length, self.ratio)] = True
            return mask

    mask = masking.build({"type": "first_k_test", "ratio": 0.25})(2, (4, 4))
    assert mask.sum().item() == 8
    assert torch.equal(masking.ids_keep(mask)[0], torch.arange(4, 16))
