"""Chunked exact search against an unchunked reference; faiss (when installed) against torch."""

import pytest
import torch
import torch.nn.functional as F

from mimkit.eval.retrieval import FaissIndex, check_backend, faiss_available, search_bytes, topk_cosine


def _unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("chunks", [(5, 1), (7, 13), (64, 1000), (None, None)])
def test_chunked_search_equals_an_unchunked_reference(chunks):
    g = torch.Generator().manual_seed(3)
    keys, queries = _unit(301, 16, g), _unit(45, 16, g)
    sims, idx = topk_cosine(queries, keys, 9, query_chunk=chunks[0], key_chunk=chunks[1])
    ref_s, ref_i = (queries @ keys.T).topk(9, dim=1)
    torch.testing.assert_close(sims, ref_s)
    assert torch.equal(idx, ref_i)


def test_fp16_keys_find_the_same_neighbours_up_to_rounding():
    g = torch.Generator().manual_seed(4)
    keys, queries = _unit(500, 32, g), _unit(20, 32, g)
    sims, idx = topk_cosine(queries, keys.half(), 1, key_chunk=64)
    ref_s, ref_i = (queries @ keys.T).topk(1, dim=1)
    torch.testing.assert_close(sims, ref_s, atol=2e-3, rtol=0)
    assert (idx == ref_i).float().mean() > 0.9  # near-ties may swap under fp16 rounding


def test_k_beyond_the_bank_and_unknown_backends_are_errors():
    keys = torch.eye(3)
    with pytest.raises(ValueError, match="k=4 must be between 1 and the number of keys 3"):
        topk_cosine(keys, keys, 4)
    with pytest.raises(ValueError, match="unknown search backend 'scann'; valid: torch, faiss"):
        check_backend("scann")


def test_search_bytes_of_the_papers_largest_bank():
    need = search_bytes(10_240_000, 768, 21, "fp16", 8192, 131072, 30)
    assert need["keys"] == 10_240_000 * 768 * 2  # 15.7 GB: fits one 80 GB GPU with the blocks
    assert sum(need.values()) < 25e9


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_backend_agrees_with_torch():
    g = torch.Generator().manual_seed(5)
    keys, queries = _unit(400, 16, g), _unit(30, 16, g)
    sims, idx = FaissIndex(keys).search(queries, 5)
    ref_s, ref_i = topk_cosine(queries, keys, 5)
    torch.testing.assert_close(sims, ref_s, atol=1e-5, rtol=0)
    assert torch.equal(idx, ref_i)
