"""The attentive probe: V-JEPA's schedules by hand, its head, a label only one patch carries, and the tool."""

import importlib
import json
import math

import pytest
import torch

from mimkit.eval.attentive_probe import (
    AttentiveHead,
    AttentiveProbe,
    _param_groups,
    probe_plan,
    train_attentive_probe,
    vjepa_lr,
    vjepa_wd,
)
from mimkit.eval.linear_probe import MaeProbe, train_mae_probe
from mimkit.models import create_backbone, save_backbone
from tests.eval import single_thread as _single_thread

single_thread = pytest.fixture(autouse=True)(_single_thread)

DATA = "synthetic:shapes?size=32&train=48&val=24"


def one_patch_label(n: int, classes: int = 4, copies: int = 2, dim: int = 32, seed: int = 0):
    """Token maps whose label only one token, at a random place, carries; their mean carries none.

    ``seed`` draws the samples; the class vectors and the marker are the same for every seed.

    Every sample holds each of ``classes`` class vectors ``copies`` times (8 tokens by default), in
    a random order; one token of the labelled class also carries a marker vector. The token mean is
    then the same for every label (plus noise), so mean pooling is at chance, while a query that
    finds the marker reads the class from that token.
    """
    fixed = torch.Generator().manual_seed(1234)  # the same class vectors and marker in every split
    basis = torch.linalg.qr(torch.randn(dim, classes + 1, generator=fixed)).Q.T * 3  # orthogonal, norm 3
    centres, marker = basis[:classes], basis[classes]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=g)
    order = torch.stack([torch.randperm(classes * copies, generator=g) for _ in range(n)]) % classes
    tokens = centres[order] + 0.1 * torch.randn(n, classes * copies, dim, generator=g)
    # the marked token: one of the labelled class's copies, chosen at random
    chosen = torch.stack([(o == y).nonzero()[torch.randint(copies, (1,), generator=g)].squeeze() for o, y
                          in zip(order, labels)])  # fmt: skip
    tokens[torch.arange(n), chosen] += marker
    return {"patch_tokens": tokens, "patch_mean": tokens.mean(1), "cls": tokens.mean(1), "label": labels}


def test_the_attentive_probe_reads_the_one_patch_that_mean_pooling_averages_away():
    train, test = one_patch_label(512, seed=0), one_patch_label(256, seed=1)
    attentive = train_attentive_probe(train, test, 4, AttentiveProbe(epochs=20, batch_size=64, num_heads=4))
    linear = train_mae_probe(train, test, 4, MaeProbe(epochs=30, effective_batch=64, batch_size=64, blr=5.0))
    assert attentive["top1"] >= 95.0
    assert linear["top1"] <= 25.0 + 12.0  # chance is 25%: the mean holds no label information
    # the same head on shuffled token order inside each sample learns the same: it pools a set
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    shuffled = {**test, "patch_tokens": test["patch_tokens"][:, perm]}
    head = attentive["head"].eval()
    with torch.no_grad():
        same = head(test["patch_tokens"]).argmax(1) == head(shuffled["patch_tokens"]).argmax(1)
    assert bool(same.all())


def test_vjepa_schedules_by_hand():
    # no warm-up: the first call already decays (V-JEPA steps before each iteration)
    assert vjepa_lr(1, 100, 0, 1e-3, 0.0) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 100)))
    assert vjepa_lr(50, 100, 0, 1e-3, 0.0) == pytest.approx(5e-4)
    assert vjepa_lr(100, 100, 0, 1e-3, 0.0) == pytest.approx(0.0)
    assert vjepa_lr(5, 100, 10, 1e-3, 0.0) == pytest.approx(5e-4)  # half-way through the warm-up
    assert vjepa_lr(10, 100, 10, 1e-3, 0.0) == pytest.approx(1e-3)
    assert vjepa_wd(50, 100, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    assert vjepa_wd(100, 100, 1e-3, 1e-6) == pytest.approx(1e-6)


def test_the_head_is_vjepas_and_decays_matrices_only():
    torch.manual_seed(0)
    head = AttentiveHead(64, 5, num_heads=16).requires_grad_(False)
    assert head(torch.randn(3, 10, 64)).shape == (3, 5)
    assert head.pool.num_heads == 16 and head.pool.mlp.fc1.out_features == 256
    assert float(head.pool.kv.weight.std()) == pytest.approx(0.02, rel=0.1)
    assert float(head.pool.mlp.fc2.weight.std()) == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert float(head.pool.latent.std()) == pytest.approx(0.02, rel=0.3)
    decay, plain = _param_groups(head.requires_grad_(True))
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert plain["weight_decay"] == 0.0 and len(decay["params"]) + len(plain["params"]) == len(
        list(head.parameters())
    )


def test_plan_defaults_are_vjepas_and_heads_default_to_the_encoders():
    s = AttentiveProbe()
    assert (s.epochs, s.batch_size, s.lr, s.weight_decay, s.final_weight_decay, s.grad_clip) == (
        20, 1024, 1e-3, 1e-3, 1e-6, 1.0
    )  # fmt: skip
    plan = probe_plan(s, 1_281_167, 1024, encoder_heads=16)
    assert plan["num_heads"] == 16 and plan["steps_per_epoch"] == 1_281_167 // 1024
    assert probe_plan(AttentiveProbe(batch_size=8), 48, 32, encoder_heads=2)["num_heads"] == 2


def test_patch_tokens_are_the_final_normed_tokens_of_the_last_block():
    from mimkit.eval.features import encode

    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    images = torch.randn(2, 3, 32, 32)
    feats = encode(model.eval(), images, tokens=True)
    with torch.no_grad():
        want = model.forward_features(images)[:, 1:]
    torch.testing.assert_close(feats["patch_tokens"], want)
    torch.testing.assert_close(feats["patch_mean"], want.mean(1))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(123)
    model = create_backbone("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    return save_backbone(model, tmp_path_factory.mktemp("export") / "tiny").parent


@pytest.mark.parametrize("cached", [True, False])
def test_tool_writes_the_json(cached, export, tmp_path, capsys):
    out = tmp_path / "ap.json"
    args = ["--encoder", str(export), "--train", DATA, "--batch-size", "16", "--epochs", "2",
            "--workers", "0", "--no-progress", "--json", str(out)]  # fmt: skip
    args += ["--cached"] if cached else []
    assert importlib.import_module("mimkit.cli.attentive_probe").main(args) == 0
    printed = capsys.readouterr().out
    assert "token cache" in printed and "attentive probe" in printed
    res = json.loads(out.read_text())
    assert res["tool"] == "attentive_probe" and res["mode"] == ("cached" if cached else "augmented")
    s = res["settings"]
    assert (s["num_heads"], s["steps_per_epoch"], s["total_steps"], s["lr"]) == (2, 3, 6, 1e-3)
    assert len(res["results"]["top1_per_epoch"]) == 2 and 0 <= res["results"]["top1"] <= 100
    assert s["token_bytes"] == (48 * cached + 24) * 16 * 32 * 4


def test_tool_vs_random_prints_both(export, tmp_path, capsys):
    out = tmp_path / "ap.json"
    args = ["--encoder", str(export), "--train", DATA, "--batch-size", "16", "--epochs", "1", "--cached",
            "--vs-random", "--workers", "0", "--no-progress", "--json", str(out)]  # fmt: skip
    assert importlib.import_module("mimkit.cli.attentive_probe").main(args) == 0
    assert "pretrained  random init" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["random init"]["encoder"]["random_init"] is True
    assert res["pretrained"]["encoder"]["sha256"] != res["random init"]["encoder"]["sha256"]


def test_the_cached_tokens_are_reused(export, tmp_path):
    from mimkit.eval.attentive_probe import attentive_probe
    from mimkit.eval.features import load_encoder
    from mimkit.eval.settings import ExtractSettings

    encoder = load_encoder(export)
    extract = ExtractSettings(batch_size=16, cache_dir=tmp_path, progress=False)
    probe = AttentiveProbe(epochs=1, batch_size=16)
    first = attentive_probe(encoder, DATA, cached=True, settings=probe, extract=extract, log=None)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # train and val token maps
    second = attentive_probe(encoder, DATA, cached=True, settings=probe, extract=extract, log=None)
    assert first["results"]["top1_per_epoch"] == second["results"]["top1_per_epoch"]
