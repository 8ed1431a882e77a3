"""Feature extraction against a hand-written forward; loading encoders; the feature cache."""

import json

import pytest
import torch

from mimkit.eval import (
    ExtractSettings,
    encode,
    encoder_digest,
    extract_features,
    load_encoder,
    source_features,
)
from mimkit.eval import features as features_module
from mimkit.models import create_backbone, save_backbone

TINY = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def _hand_forward(model, images):
    """Patch embedding, cls + positions, each block, each output through the final norm."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], dim=1) + model.pos_embed
    normed = []
    for block in model.blocks:
        x = block(x)
        normed.append(model.norm(x))
    return normed


def test_features_match_a_hand_computed_forward():
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16", pos_embed="learn", **TINY).eval()
    images = torch.randn(5, 3, 32, 32)
    dataset = [{"image": img, "label": torch.tensor(i % 3)} for i, img in enumerate(images)]
    feats = extract_features(model, dataset, ExtractSettings(n_last_blocks=2, batch_size=2, progress=False))

    with torch.no_grad():
        normed = _hand_forward(model, images)
    torch.testing.assert_close(feats["cls"], normed[-1][:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["patch_mean"], normed[-1][:, 1:].mean(1), atol=1e-5, rtol=1e-5)
    expected_last = torch.stack([normed[-2][:, 0], normed[-1][:, 0]], dim=1)  # oldest block first
    torch.testing.assert_close(feats["last_cls"], expected_last, atol=1e-5, rtol=1e-5)
    assert feats["label"].tolist() == [0, 1, 2, 0, 1]
    # the final-normed cls of the last block is what timm's forward_features gives at token 0
    torch.testing.assert_close(feats["cls"], model.forward_features(images)[:, 0], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_gives_float32_features_close_to_fp32():
    model = create_backbone("vit_tiny_patch16", **TINY).eval()
    images = torch.randn(4, 3, 32, 32)
    full, half = encode(model, images, 2), encode(model, images, 2, precision="bf16")
    assert all(v.dtype == torch.float32 for v in half.values())
    cos = torch.nn.functional.cosine_similarity(full["last_cls"].flatten(1), half["last_cls"].flatten(1))
    assert cos.min() > 0.99
    with pytest.raises(ValueError, match="unknown precision 'int8'; valid: fp32, bf16, fp16"):
        encode(model, images, precision="int8")


def test_several_encoders_share_one_pass_and_unlabelled_data_has_no_label():
    a = create_backbone("vit_tiny_patch16", **TINY).eval()
    b = create_backbone("vit_tiny_patch16", **TINY).eval()
    dataset = [{"image": torch.randn(3, 32, 32)} for _ in range(3)]
    both = extract_features({"a": a, "b": b}, dataset, ExtractSettings(batch_size=2, progress=False))
    alone = extract_features(a, dataset, ExtractSettings(progress=False))
    torch.testing.assert_close(both["a"]["cls"], alone["cls"])
    assert "label" not in both["b"] and not torch.allclose(both["a"]["cls"], both["b"]["cls"])


@pytest.fixture()
def export(tmp_path):
    torch.manual_seed(123)
    model = create_backbone("vit_tiny_patch16", **TINY)
    save_backbone(model, tmp_path / "export")
    return tmp_path / "export", model


def test_load_encoder_reads_exports_files_and_run_directories(export, tmp_path):
    path, model = export
    want = encoder_digest(model)
    assert encoder_digest(load_encoder(path)) == want
    assert encoder_digest(load_encoder(path / "encoder.safetensors")) == want
    run = tmp_path / "run"
    save_backbone(model, run)
    (run / "metrics.jsonl").write_text("")
    loaded = load_encoder(run)
    assert encoder_digest(loaded) == want and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())


def test_a_backbone_name_loads_a_timm_keyed_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = create_backbone("vit_tiny_patch16")
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    loaded = load_encoder("vit_tiny_patch16", checkpoint=tmp_path / "weights.safetensors")
    assert encoder_digest(loaded) == encoder_digest(model)


def test_random_init_has_the_same_shape_other_weights_and_is_seeded(export):
    path, model = export
    r0, r0_again, r1 = (load_encoder(path, random_init=True, seed=s) for s in (0, 0, 1))
    assert r0.config == model.config
    assert encoder_digest(r0) != encoder_digest(model)
    assert encoder_digest(r0) == encoder_digest(r0_again) != encoder_digest(r1)
    assert r0.origin["random_init"] is True


def test_img_size_override_regenerates_positions(export):
    path, _ = export
    model = load_encoder(path, img_size=48)
    assert model.pos_embed.shape[1] == 1 + 6 * 6
    assert model.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)


def test_missing_encoder_and_unfinished_run_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: expected an export directory"):
        load_encoder(tmp_path / "nowhere")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="no exported encoder yet"):
        load_encoder(run)
    with pytest.raises(ValueError, match="checkpoint or random_init"):
        load_encoder("vit_tiny_patch16")


def test_source_features_are_cached_by_encoder_and_data(export, tmp_path, monkeypatch):
    path, _ = export
    model = load_encoder(path)
    uri = "synthetic:shapes?size=32&train=6&val=4"
    cached = ExtractSettings(cache_dir=tmp_path / "cache", progress=False)
    first = source_features(model, uri, "val", cached)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert int(first["num_classes"]) == 7 and len(first["label"]) == 4

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(features_module, "extract_features", fail)
    again = source_features(model, uri, "val", cached)
    torch.testing.assert_close(again["cls"], first["cls"])
    with pytest.raises(AssertionError, match="cache was not used"):  # another split is another key
        source_features(model, uri, "train", cached)
    assert json.loads((path / "encoder.json").read_text())["name"] == "vit_tiny_patch16"


def test_extraction_is_identical_with_and_without_loader_processes():
    from mimkit.data import build_source, build_transform
    from mimkit.eval.features import input_normalization

    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16", **TINY).eval()
    transform = build_transform("eval", 32, input_normalization(model))
    dataset = build_source("synthetic:shapes?size=32&train=20&val=1", "train", transform)
    runs = {
        workers: extract_features(
            model, dataset, ExtractSettings(batch_size=6, workers=workers, progress=False), tokens=True
        )
        for workers in (0, 2)
    }
    assert set(runs[0]) == {"cls", "patch_mean", "last_cls", "patch_tokens", "label"}
    assert runs[0]["patch_tokens"].shape == (20, 16, 32) and len(runs[0]["label"]) == 20
    for key, value in runs[0].items():
        assert torch.equal(value, runs[2][key]), key


def test_the_prefetch_thread_keeps_order_raises_where_the_loader_failed_and_stops_early():
    from mimkit.eval.features import prefetched

    assert list(prefetched(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield from range(3)
        raise OSError("image 3 is truncated")

    seen = []
    with pytest.raises(OSError, match="image 3 is truncated"):
        for item in prefetched(failing()):
            seen.append(item)
    assert seen == [0, 1, 2]
    endless = prefetched(iter(range(10**9)), depth=1)
    assert next(endless) == 0
    endless.close()  # the consumer stops: the thread ends instead of filling forever


def test_a_token_cache_serves_the_token_free_features_too(export, tmp_path, monkeypatch):
    path, _ = export
    model = load_encoder(path)
    uri = "synthetic:shapes?size=32&train=6&val=4"
    cached = ExtractSettings(cache_dir=tmp_path, progress=False)
    with_tokens = source_features(model, uri, "val", cached, tokens=True)
    assert with_tokens["patch_tokens"].shape == (4, 16, 32)
    monkeypatch.setattr(
        features_module, "extract_features", lambda *a, **k: pytest.fail("not read from the cache")
    )
    plain = source_features(model, uri, "val", cached)
    assert "patch_tokens" not in plain
    torch.testing.assert_close(plain["cls"], with_tokens["cls"])
    assert torch.equal(features_module.split_labels(model, uri, "val", cached), with_tokens["label"])
