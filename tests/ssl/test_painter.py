"""Painter: canvas layout and palette, the output-heavy mask, export to load_backbone and timm,
and a loss that falls on a fixed batch."""

import pytest
import timm
import torch

import mimkit
from mimkit.models import load_backbone, save_backbone
from mimkit.ssl import build_method
from mimkit.ssl import canvas as cv
from mimkit.ssl.masking import build as build_mask
from mimkit.ssl.painter import CanvasMasking, foreground_of
from mimkit.ssl.targets import patchify
from mimkit.train import load_recipe
from tests.helpers import REPO

TINY = {
    "name": "painter",
    "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2},
    "decoder_dim": 16,
    "merge_block": 0,
}


def test_canvas_quadrants_and_separators():
    side, sep = 32, 1
    cell = cv.cell_size(side, sep)
    assert cell == 15
    cells = {name: torch.full((2, 3, cell, cell), float(i)) for i, name in enumerate(cv.QUADRANTS)}
    canvas = cv.stitch(cells, side, sep, torch.full((3,), 9.0))
    assert canvas.shape == (2, 3, 32, 32)
    # each cell sits in its quadrant, against the canvas edge
    assert (canvas[..., :15, :15] == 0).all() and (canvas[..., :15, 17:] == 1).all()
    assert (canvas[..., 17:, :15] == 2).all() and (canvas[..., 17:, 17:] == 3).all()
    # a 2 px separator cross along the middle
    assert (canvas[..., 15:17, :] == 9).all() and (canvas[..., :, 15:17] == 9).all()
    for i, name in enumerate(cv.QUADRANTS):
        assert (cv.crop_cell(canvas, name, sep) == i).all()
    answer = cv.answer_patch_mask((4, 4)).view(4, 4)
    assert answer.sum() == 4 and answer[2:, 2:].all()
    assert cv.output_half_mask((4, 4)).view(4, 4)[:, 2:].all() and cv.output_half_mask((4, 4)).sum() == 8


@pytest.mark.parametrize("num_classes", [3, 4, 21, 150])
def test_palette_round_trip_is_exact(num_classes):
    palette = cv.Palette(num_classes)
    assert len(torch.unique(palette.colors, dim=0)) == num_classes
    labels = torch.randint(0, num_classes, (2, 9, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(palette.decode(palette.render(labels)), labels)
    # ignored pixels are grey, which no class owns
    grey = palette.render(torch.full((1, 2, 2), 255), ignore_index=255)
    assert torch.allclose(grey, torch.full_like(grey, cv.VOID_GREY))
    assert not (palette.colors == cv.VOID_GREY).all(1).any()


@pytest.mark.parametrize("num_classes", [4, 150])
def test_palette_decodes_any_painting_to_its_nearest_colour_by_l1_first_on_ties(num_classes):
    palette = cv.Palette(num_classes)
    pixels = torch.rand(2, 3, 7, 5, generator=torch.Generator().manual_seed(1))
    palette.colors[:2] = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]])
    pixels[0, :, 0, 0] = 0.25  # exactly as far from colours 0 and 1, and nearer than any other
    palette.colors[2:] = palette.colors[2:].clamp(min=0.75)
    dist = (pixels.permute(0, 2, 3, 1)[..., None, :] - palette.colors).abs().sum(-1)
    assert dist[0, 0, 0, 0] == dist[0, 0, 0, 1] == dist[0, 0, 0].min()  # a tie: argmin gives the first
    assert torch.equal(palette.decode(pixels), dist.argmin(-1))


def test_binary_palette_is_black_and_white_and_thresholds():
    palette = cv.Palette(2, binary=True)
    labels = torch.randint(0, 2, (3, 8, 8))
    rendered = palette.render(labels)
    assert set(rendered.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(palette.decode(rendered), labels)
    assert torch.equal(palette.decode(rendered * 0.4 + 0.35), labels)  # a faded painting still reads


@pytest.mark.parametrize("ratio, share", [(0.5, 0.75), (0.5, 0.9), (0.75, 0.6), (0.3, 1.0)])
def test_mask_puts_the_configured_share_on_the_output_half(ratio, share):
    gen = CanvasMasking(ratio=ratio, output_share=share, answer_prob=0.0)
    mask = gen(64, (8, 8), generator=torch.Generator().manual_seed(0))
    total = mask.sum(1)
    on_output = mask[:, cv.output_half_mask((8, 8))].sum(1)
    assert (total == total[0]).all()
    assert (on_output >= torch.minimum(torch.full_like(total, 32), (share * total).floor())).all()


def test_answer_prob_masks_the_whole_answer_quadrant():
    gen = build_mask({"type": "canvas", "ratio": 0.5, "output_share": 0.75, "answer_prob": 1.0})
    mask = gen(16, (8, 8), generator=torch.Generator().manual_seed(1))
    assert mask[:, cv.answer_patch_mask((8, 8))].all()
    with pytest.raises(ValueError, match="answer_prob"):
        CanvasMasking(ratio=0.2, output_share=0.5, answer_prob=0.5)(2, (8, 8))


def test_training_canvas_pairs_images_with_their_rendered_outputs():
    torch.manual_seed(0)
    model = build_method({**TINY, "tasks": ["segmentation"], "separator": 0})
    images = torch.randn(3, 3, 32, 32)
    masks = torch.randint(0, 4, (3, 32, 32))
    canvas = model.build_canvases({"image": images, "mask": masks})
    norm = model.normalization
    decoded = model.palette.decode(cv.denormalize(cv.crop_cell(canvas, "support_output", 0), norm))
    assert torch.equal(decoded, cv.resize_labels(masks, 16))
    # the bottom row is the next image of the batch, with its own output
    assert torch.equal(cv.crop_cell(canvas, "query_image", 0), cv.resize_images(images, 16)[[1, 2, 0]])
    answer = model.palette.decode(cv.denormalize(cv.crop_cell(canvas, "answer", 0), norm))
    assert torch.equal(answer, cv.resize_labels(masks, 16)[[1, 2, 0]])


def test_foreground_class_is_present_and_not_background():
    labels = torch.zeros(4, 8, 8, dtype=torch.long)
    labels[0, :2] = 3
    labels[1, :2], labels[1, 4:] = 1, 2
    labels[2] = 255
    fg = foreground_of(labels, 255, torch.Generator().manual_seed(0))
    assert fg[0] == 3 and fg[1] in (1, 2) and fg[2] == 0 and fg[3] == 0


def test_painter_encoder_loads_with_load_backbone_and_into_timm(tmp_path):
    torch.manual_seed(0)
    model = build_method(TINY).eval()
    save_backbone(model.encoder, tmp_path)
    loaded = load_backbone(tmp_path / "encoder.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.encoder.forward_features(x))
    net = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2
    ).eval()
    net.load_state_dict(mimkit.export_timm(model.encoder), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net.forward_features(x), model.encoder.forward_features(x))


def test_tiny_painter_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_method({**TINY, "tasks": ["segmentation", "foreground", "edges", "identity"]})
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(4, 3, 32, 32, generator=gen),
        "mask": torch.randint(0, 4, (4, 32, 32), generator=gen),
    }
    mask = model.mask_generator(4, model.encoder.grid_size, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        torch.manual_seed(1)  # the same tasks and foreground classes every step
        loss = model(batch, mask=mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::20]


def test_painter_needs_masks_for_mask_tasks_and_names_them():
    model = build_method(TINY)
    with pytest.raises(ValueError, match="segmentation=1"):
        model({"image": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="tasks"):
        build_method({**TINY, "tasks": ["depth"]})


@pytest.mark.parametrize(
    "recipe",
    [
        "recipes/demo/painter_vit_tiny.yaml",
        "recipes/demo/painter_vit_tiny6_canvas96.yaml",
        "recipes/painter/vit_large_patch16.yaml",
    ],
)
def test_painter_recipes_validate(recipe):
    r = load_recipe(REPO / recipe, check_data=False)
    assert r.method.name == "painter"
    if "demo" in recipe:  # small enough to build and run: the options must fit the encoder
        torch.manual_seed(0)
        model = build_method(r.method.to_dict())
        if "depth" in r.method.backbone:
            assert len(model.encoder.blocks) == r.method.backbone["depth"]
        side = model.side
        out = model({"image": torch.randn(2, 3, side, side), "mask": torch.randint(0, 4, (2, side, side))})
        assert torch.isfinite(out["loss"]) and out["canvas"].shape == (2, 3, side, side)


def test_foreground_canvases_pair_images_that_hold_the_class():
    torch.manual_seed(0)
    model = build_method({**TINY, "tasks": ["foreground"], "separator": 0})
    masks = torch.zeros(4, 32, 32, dtype=torch.long)
    for i, k in enumerate([1, 2, 1, 2]):
        masks[i, :16] = k
    canvas = model.build_canvases({"image": torch.randn(4, 3, 32, 32), "mask": masks})
    answer = model.binary.decode(cv.denormalize(cv.crop_cell(canvas, "answer", 0), model.normalization))
    support = model.binary.decode(
        cv.denormalize(cv.crop_cell(canvas, "support_output", 0), model.normalization)
    )
    assert (answer.sum((1, 2)) > 0).all() and (support.sum((1, 2)) > 0).all()


def _tiny_painter(**options):
    torch.manual_seed(0)
    cfg = {**TINY, "backbone": {**TINY["backbone"], "depth": 8}, "merge_block": 1, **options}
    return build_method(cfg).eval()


def test_streams_run_as_one_batch_until_merge_block_then_as_one_averaged_sequence():
    model = _tiny_painter()
    seen = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
        for blk in model.encoder.blocks
    ]
    canvases = torch.randn(3, 3, 32, 32)
    mask = cv.answer_patch_mask(model.encoder.grid_size).expand(3, -1)
    with torch.no_grad():
        model.paint(canvases, mask)
    for h in hooks:
        h.remove()
    dim = model.encoder.embed_dim
    # 16 canvas patches: 8 per stream, no cls token (Painter's); blocks 0 and 1 see both streams
    assert seen == [(6, 8, dim)] * 2 + [(3, 8, dim)] * 6
    assert not model.encoder.cls_token.requires_grad
    assert model.levels == [1, 3, 5, 7]
    with pytest.raises(ValueError, match=r"merge_block=3 must be in \[0, 0\]"):
        build_method({**TINY, "merge_block": 3})


def test_paint_keeps_visible_patches_and_never_sees_the_hidden_answer():
    model = _tiny_painter()
    canvases = torch.randn(2, 3, 32, 32)
    mask = cv.answer_patch_mask(model.encoder.grid_size).expand(2, -1)
    other = canvases.clone()
    other[..., 16:, 16:] = torch.randn(2, 3, 16, 16)  # another answer under the mask
    with torch.no_grad():
        painted, painted_other = model.paint(canvases, mask), model.paint(other, mask)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[16:, 16:] = False
    assert torch.equal(painted[..., outside], canvases[..., outside])
    assert not torch.allclose(painted[..., 16:, 16:], canvases[..., 16:, 16:])
    torch.testing.assert_close(painted[..., 16:, 16:], painted_other[..., 16:, 16:])
    # and the loss is on the hidden outputs only: a perfect prediction there scores zero
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 4, (2, 32, 32))}
    out = model(batch, mask=mask)
    assert out["pred"][:, ~mask[0]].abs().sum() == 0 and out["pred"][:, mask[0]].abs().sum() > 0


@pytest.mark.parametrize("band", [(0, 1), (1, 3), (2, 4), (0, 4), (3, 4)])
def test_head_painting_a_band_of_rows_equals_the_whole_paintings_crop(band):
    model = _tiny_painter(decoder_dim=8)
    rows, cols = 4, 2
    tokens = torch.randn(2, rows * cols, model.head.embed.in_features)
    with torch.no_grad():
        whole = model.head(tokens, (rows, cols))
        part = model.head(tokens, (rows, cols), band)
    p = model.patch_size
    torch.testing.assert_close(part, whole[:, :, band[0] * p : band[1] * p])
    with pytest.raises(ValueError, match="0 <= first < stop <= 4"):
        model.head(tokens, (rows, cols), (2, 5))


def test_paint_equals_the_whole_output_columns_prediction_at_masked_patches():
    model = _tiny_painter()
    canvases = torch.randn(3, 3, 32, 32)
    gen = torch.Generator().manual_seed(1)
    mask = CanvasMasking(0.25, 1.0, 0.0).sample(3, model.encoder.grid_size, gen)
    with torch.no_grad():
        painted = model.paint(canvases, mask)
        column = model.predict_outputs(canvases, mask)  # (B, 3, 32, 16): every output patch
    pixels = mask.view(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(-1, 3, -1, -1)
    expected = torch.where(pixels[..., 16:], column, canvases[..., 16:])
    torch.testing.assert_close(painted[..., 16:], expected)
    assert torch.equal(painted[..., :16], canvases[..., :16])
    assert torch.equal(model.paint(canvases, torch.zeros_like(mask)), canvases)


@pytest.mark.parametrize("answer_prob", [0.0, 1.0])
def test_training_loss_on_the_painted_band_equals_the_loss_on_the_whole_column(answer_prob):
    model = _tiny_painter()
    torch.manual_seed(2)
    batch = {"image": torch.randn(3, 3, 32, 32), "mask": torch.randint(0, 4, (3, 32, 32))}
    gen = torch.Generator().manual_seed(3)
    mask = CanvasMasking(0.25, 1.0, answer_prob).sample(3, model.encoder.grid_size, gen)
    torch.manual_seed(4)  # the same tasks and partners in both canvases
    out = model(batch, mask=mask)
    torch.manual_seed(4)
    canvases = model.build_canvases(batch)
    column = model.predict_outputs(canvases, mask)  # every output patch painted
    hidden = mask[:, model.output_idx]
    pred = patchify(column, 8)[hidden]
    target = patchify(canvases, 8)[:, model.output_idx][hidden]
    expected = torch.nn.functional.smooth_l1_loss(pred, target, beta=model.smooth_l1_beta)
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["pred"][:, model.output_idx][hidden], pred.detach())
