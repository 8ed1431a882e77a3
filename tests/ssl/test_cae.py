"""CAE: gradient paths, what each branch sees, the loss formula, targets, recipes, a short run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mimkit.ssl.cae  # noqa: F401  (registers 'cae')
from mimkit.ssl import build_method, masking
from mimkit.ssl.cae import CAE
from mimkit.ssl.masking import ids_keep, ids_masked
from mimkit.ssl.targets import patchify
from tests.helpers import subprocess_env

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "name": "cae",
    "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2, "init_values": 0.1},
    "regressor_depth": 2,
    "decoder_depth": 1,
}
GRID_MASK = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1]] * 2, dtype=torch.bool)


def _images(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _pixel_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) patch mask -> (B, 1, 32, 32) pixel mask for the 4 x 4 grid of 8-px patches."""
    return mask.view(-1, 1, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)


def test_forward_outputs_and_default_mask():
    torch.manual_seed(0)
    model = build_method(TINY)
    assert isinstance(model, CAE)
    out = model({"image": _images(batch=3)})
    for key in ("loss", "loss_rec", "loss_align"):
        assert out[key].ndim == 0 and torch.isfinite(out[key])
    assert (out["patch_mask"].sum(1) == 8).all()  # block masking, ratio 0.5
    assert out["latent_pred"].shape == out["latent_target"].shape == (3, 8, 192)
    assert out["pred"].shape == (3, 16, 8 * 8 * 3)
    assert (out["pred"][~out["patch_mask"]] == 0).all()
    # the official count: 98 of 196 patches at 224 px / 16
    official = masking.build(CAE.default_mask)(2, (14, 14), generator=torch.Generator().manual_seed(0))
    assert official.sum(1).tolist() == [98, 98]
    random = build_method({**TINY, "mask": {"type": "random", "ratio": 0.75}})
    assert isinstance(random.mask_generator, masking.RandomMasking)


def test_no_gradient_through_alignment_targets():
    torch.manual_seed(0)
    model = build_method(TINY)
    images = _images().requires_grad_(True)
    out = model({"image": images}, mask=GRID_MASK)
    assert not out["latent_target"].requires_grad

    params = [p for p in model.encoder.parameters() if p.requires_grad]
    got = torch.autograd.grad(out["loss_align"], params, retain_graph=True, allow_unused=True)
    ref = F.mse_loss(out["latent_pred"], out["latent_target"].detach().clone())
    want = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w))
    # ... but the alignment loss does reach the encoder, through the regressor's visible latents
    assert sum(float(g.abs().sum()) for g in got if g is not None) > 0

    # masked pixels enter only through the targets, so the whole loss gives them no gradient
    out["loss"].backward()
    masked_pixels = _pixel_mask(GRID_MASK).expand_as(images)
    assert (images.grad[masked_pixels] == 0).all()
    assert images.grad[~masked_pixels].abs().sum() > 0


def test_pretext_path_sees_only_visible_patches():
    torch.manual_seed(0)
    model = build_method(TINY).eval()
    images = _images()
    changed = torch.where(_pixel_mask(GRID_MASK), _images(seed=1), images)  # new masked patches only
    with torch.no_grad():
        a, b = model({"image": images}, mask=GRID_MASK), model({"image": changed}, mask=GRID_MASK)
    torch.testing.assert_close(b["latent_pred"], a["latent_pred"], rtol=0, atol=1e-6)
    torch.testing.assert_close(b["pred"], a["pred"], rtol=0, atol=1e-6)
    assert (b["latent_target"] - a["latent_target"]).abs().amax(-1).gt(1e-2).all()  # every masked token
    # and changing a visible patch does change the prediction
    visible = torch.where(_pixel_mask(GRID_MASK), images, _images(seed=2))
    with torch.no_grad():
        c = model({"image": visible}, mask=GRID_MASK)
    assert not torch.allclose(c["pred"], a["pred"], atol=1e-3)


def test_regressor_never_updates_visible_latents():
    torch.manual_seed(0)
    model = build_method({**TINY, "regressor_depth": 3}).eval()
    images = _images()
    seen, before = [], {}
    record = lambda module, args: seen.append(args[1].clone())  # noqa: E731
    hooks = [block.register_forward_pre_hook(record) for block in model.regressor.blocks]
    hooks.append(model.regressor.register_forward_pre_hook(lambda m, args: before.update(v=args[1].clone())))
    after = {}
    hooks.append(model.regressor.register_forward_hook(lambda m, args, out: after.update(v=args[1])))
    with torch.no_grad():
        model({"image": images}, mask=GRID_MASK)
        encoded = model.encoder.forward_visible(images, ids_keep(GRID_MASK))[:, 1:]
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for visible in [before["v"], *seen, after["v"]]:
        assert torch.equal(visible, encoded)


def test_loss_is_reconstruction_plus_weighted_alignment():
    torch.manual_seed(0)
    images, mask = _images(), GRID_MASK
    for weight in (2.0, 0.5):
        model = build_method({**TINY, "align_loss_weight": weight}).eval()
        with torch.no_grad():
            out = model({"image": images}, mask=mask)
            target = patchify(images, 8)
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
            rec = ((out["pred"] - target) ** 2)[mask].mean()
            z_masked = model.encoder.forward_visible(images, ids_masked(mask))[:, 1:]
            align = ((out["latent_pred"] - z_masked) ** 2).mean()
        torch.testing.assert_close(out["latent_target"], z_masked)
        torch.testing.assert_close(out["loss_rec"], rec)
        torch.testing.assert_close(out["loss_align"], align)
        torch.testing.assert_close(out["loss"], rec + weight * align)
    assert abs(float(rec + 2.0 * align) - float(out["loss"])) > 1e-3  # the weight matters


class StandInTokenizer(nn.Module):
    """A frozen stand-in for DALL-E's encoder: a random 8-px patch projection to ``vocab`` logits."""

    def __init__(self, vocab: int = 16, as_ids: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(3, vocab, 8, stride=8)
        self.as_ids = as_ids

    def forward(self, images):
        logits = self.proj(images)
        return logits.argmax(1) if self.as_ids else logits


def make_tokenizer(vocab: int = 16) -> nn.Module:
    """Factory named as ``tests.ssl.test_cae:make_tokenizer`` by the import-path test."""
    torch.manual_seed(3)
    return StandInTokenizer(vocab)


@pytest.mark.parametrize("as_ids", [False, True])
def test_token_target_with_a_stand_in_tokenizer(as_ids):
    torch.manual_seed(0)
    tokenizer = StandInTokenizer(16, as_ids)
    model = build_method({**TINY, "target": {"type": "tokens", "tokenizer": tokenizer, "vocab_size": 16}})
    assert not any(k.startswith("target") for k in model.state_dict())
    images = _images()
    out = model({"image": images}, mask=GRID_MASK)
    assert out["logits"].shape == (2, 8, 16) and "pred" not in out
    ids = tokenizer(images).detach()
    ids = (ids.argmax(1) if ids.is_floating_point() else ids).flatten(1)[GRID_MASK]
    torch.testing.assert_close(out["loss_rec"], F.cross_entropy(out["logits"].flatten(0, 1), ids))
    assert 0 <= float(out["mlm_acc"]) <= 1
    out["loss"].backward()
    assert tokenizer.proj.weight.grad is None and model.decoder.head.weight.grad is not None


def test_token_target_from_an_import_path_and_a_wrong_grid():
    spec = {
        "type": "tokens",
        "tokenizer": "tests.ssl.test_cae:make_tokenizer",
        "tokenizer_kwargs": {"vocab": 8},
    }
    model = build_method({**TINY, "target": {**spec, "vocab_size": 8}})
    assert isinstance(model.target.tokenizer, StandInTokenizer) and model.decoder.head.out_features == 8
    model.target._tokenizer[0].proj.stride = (16, 16)  # a 2 x 2 id grid for a 4 x 4 patch grid
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 16"):
        model({"image": _images()}, mask=GRID_MASK)


def test_tiny_cae_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = build_method({**TINY, "regressor_depth": 1})
    images = _images(batch=4)
    mask = model.mask_generator(4, model.encoder.grid_size, generator=torch.Generator().manual_seed(0))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(200):
        out = model({"image": images}, mask=mask)
        optim.zero_grad()
        out["loss"].backward()
        optim.step()
        first = first or {k: out[k].item() for k in ("loss", "loss_rec")}
    assert out["loss"].item() < 0.5 * first["loss"]
    assert out["loss_rec"].item() < 0.5 * first["loss_rec"]  # not only the alignment term


def test_official_initialisation_and_shapes():
    model = build_method({**TINY, "decoder_dim": 64, "decoder_heads": 4})
    qkv = model.encoder.blocks[0].attn.qkv.weight
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    for token in (model.mask_token, model.encoder.cls_token):
        assert token.abs().max() <= 0.02 and 0.005 < token.std() < 0.02  # trunc-normal cut at 1 std
    assert torch.all(model.regressor.blocks[0].ls1.gamma == 0.1)
    assert model.regressor.blocks[0].attn.k.bias is None and model.regressor.blocks[0].attn.q.bias is not None
    assert not model.pos_embed.requires_grad and model.pos_embed.shape == (1, 16, 64)
    assert isinstance(model.to_regressor[0], nn.Linear)  # 192 -> 64, as encoder_to_regresser
    out = model({"image": _images()}, mask=GRID_MASK)
    assert out["latent_pred"].shape == out["latent_target"].shape == (2, 8, 64)


def test_set_epoch_reaches_the_mask_generator():
    class Scheduled(masking.RandomMasking):
        epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    model = CAE(build_method(TINY).encoder, Scheduled(0.5), regressor_depth=1, decoder_depth=0)
    model.set_epoch(3)
    assert Scheduled.epochs == [3]


@pytest.mark.parametrize(
    "option, words",
    [
        ({"regressor_dept": 2}, "regressor_dept.*regressor_depth"),
        ({"regressor_depth": 0}, "regressor_depth.* 0"),
        ({"decoder_dim": 100, "decoder_heads": 3}, "decoder_dim.*100"),
        ({"align_loss_weight": -1.0}, "align_loss_weight.*-1"),
        ({"target": "pixel"}, "'pixel'.*pixels, tokens"),
        ({"target": {"type": "pixels", "norm": True}}, "norm.*norm_pix"),
        ({"target": {"type": "tokens"}}, "needs a tokenizer"),
        ({"target": {"type": "tokens", "tokenizer": "no_such_module:f"}}, "no_such_module"),
        ({"mask": {"type": "block", "ratio": 1.5}}, "1.5"),
    ],
)
def test_bad_options_name_the_value(option, words):
    with pytest.raises(ValueError, match=words):
        build_method({**TINY, **option})


def test_recipes_hold_the_official_settings():
    from mimkit.train import load_recipe

    r = load_recipe(REPO / "recipes" / "cae" / "vit_base_patch16_in1k.yaml", check_data=False)
    m = r.method
    assert m.name == "cae" and m.backbone["name"] == "vit_base_patch16" and r.img_size == 224
    assert (m.backbone["init_values"], m.backbone["drop_path_rate"]) == (0.1, 0.1)
    assert m.mask == {"type": "block", "ratio": 0.5}
    assert (m.options["regressor_depth"], m.options["decoder_depth"], m.options["align_loss_weight"]) == (
        4,
        4,
        2,
    )
    assert r.batch.global_size == 2048 and r.lr == 1.5e-3 and r.optim.min_lr == 1e-5
    assert r.optim.betas == [0.9, 0.999] and r.optim.weight_decay == 0.05 and r.optim.clip_grad == 3.0
    assert (r.train.epochs, r.optim.warmup_epochs) == (800, 20)
    demo = load_recipe(REPO / "recipes" / "demo" / "cae_vit_tiny.yaml")
    assert demo.method.name == "cae" and demo.train.precision == "fp32"


DRIVER = """\
import runpy, sys
import mimkit.ssl.cae  # registers 'cae' whether or not mimkit.ssl imports it
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_demo_recipe_trains_through_the_pretrain_tool(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = tmp_path / "run"
    overrides = [
        f"run.dir={run}",
        "method.backbone.img_size=32",
        "method.backbone.depth=2",
        "method.regressor_depth=1",
        "method.decoder_depth=1",
        "data.source=synthetic:shapes?size=32&train=16&val=8",
        "batch.global_size=8",
        "batch.micro_size=4",
        "train.max_steps=2",
        "run.log_every=1",
        "run.progress=false",
        "run.monitor=null",  # the demo's k-NN monitor and pictures are tested on their own
        "run.images_every=0",
    ]
    tool, recipe = REPO / "tools" / "pretrain.py", REPO / "recipes" / "demo" / "cae_vit_tiny.yaml"
    env = subprocess_env()
    cmd = [sys.executable, str(driver), str(tool), str(recipe), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss"] == pytest.approx(m["loss_rec"] + 2 * m["loss_align"]) for m in metrics)
    assert (run / "encoder.safetensors").is_file() and (run / "model.safetensors").is_file()
