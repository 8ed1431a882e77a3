"""``train.grad_checkpointing``: blocks are recomputed in the backward pass, gradients unchanged."""

import pytest
import torch

from mimkit.ssl import build_method

TINY = {
    "backbone": {"name": "vit_tiny_patch16", "img_size": 32, "patch_size": 8, "depth": 2},
    "decoder_dim": 32,
    "decoder_depth": 2,
    "decoder_heads": 4,
}


def _grads_and_block_calls(name: str, checkpointed: bool) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    method = build_method({"name": name, **TINY})
    method.set_grad_checkpointing(checkpointed)
    calls = 0

    def counted(forward):
        def run(*args, **kwargs):
            nonlocal calls
            calls += 1
            return forward(*args, **kwargs)

        return run

    blocks = [*method.encoder.blocks, *method.decoder.blocks] if name == "mae" else []
    for block in blocks:  # the forward itself: checkpoint's recomputation skips module hooks
        block.forward = counted(block.forward)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = method.draw_mask(4)
    method({"image": images}, mask=mask)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return grads, calls // max(1, len(blocks))


def test_checkpointed_blocks_run_twice():
    _, plain_calls = _grads_and_block_calls("mae", checkpointed=False)
    _, recomputed_calls = _grads_and_block_calls("mae", checkpointed=True)
    assert (plain_calls, recomputed_calls) == (1, 2)  # forward, then again in the backward pass


@pytest.mark.parametrize("name", ["mae", "cae", "cmae", "mixedae"])
def test_checkpointing_leaves_every_methods_gradients_unchanged(name):
    plain, _ = _grads_and_block_calls(name, checkpointed=False)
    recomputed, _ = _grads_and_block_calls(name, checkpointed=True)
    assert plain.keys() == recomputed.keys()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_no_recomputation_without_gradients():
    torch.manual_seed(0)
    method = build_method({"name": "mae", **TINY})
    method.set_grad_checkpointing(True)
    assert method.encoder.grad_checkpointing and method.decoder.grad_checkpointing
    with torch.no_grad():
        out = method({"image": torch.randn(2, 3, 32, 32)})
    assert torch.isfinite(out["loss"])
