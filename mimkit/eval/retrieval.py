"""Exact nearest-neighbour search by cosine similarity over a large memory bank, in chunks.

Keys are L2-normalised once when they enter the bank (fp16 on a GPU, fp32 on the CPU, where half
matmuls are slow or missing), so a search is one inner product per (query chunk, key chunk) block
followed by a running top-k: the largest temporary is a ``query_chunk x key_chunk`` block, whatever
the bank's size. 10,240,000 keys x 768 dims in fp16 are 15.7 GB, which an 80 GB GPU holds with room
for the blocks; :func:`search_bytes` states the total before anything is built.

``backend="faiss"`` uses faiss' exact ``IndexFlatIP`` (on the GPU where faiss has one) when faiss is
installed; it returns the same neighbours up to ties and fp16 rounding.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "faiss")
KEY_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Block sizes: a 1024 x 16384 fp32 block is 64 MiB on the CPU; 8192 x 131072 fp16 is 2 GiB on a GPU.
CPU_CHUNKS = (1024, 16384)
GPU_CHUNKS = (8192, 131072)


def default_key_dtype(device: str | torch.device) -> str:
    """``fp16`` on a GPU (half the memory, tensor-core matmuls), ``fp32`` elsewhere."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def default_chunks(device: str | torch.device) -> tuple[int, int]:
    """``(query_chunk, key_chunk)`` for ``device``."""
    return GPU_CHUNKS if torch.device(device).type == "cuda" else CPU_CHUNKS


def faiss_available() -> bool:
    """Whether the optional faiss package can be imported."""
    return importlib.util.find_spec("faiss") is not None


def check_backend(backend: str) -> None:
    """Raise a ValueError naming ``backend`` unless it is known and usable here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise ValueError(
            "search backend 'faiss' needs the faiss package (pip install faiss-cpu); use 'torch'"
        )


def search_bytes(
    num_keys: int, dim: int, num_values: int, key_dtype: str, query_chunk: int, key_chunk: int, k: int
) -> dict[str, int]:
    """Bytes the search needs: keys, fp16 values, one similarity block, and the top-k buffers."""
    key_bytes = torch.finfo(KEY_DTYPES[key_dtype]).bits // 8
    return {
        "keys": num_keys * dim * key_bytes,
        "values": num_keys * num_values * 2,
        "block": query_chunk * min(key_chunk, max(num_keys, 1)) * 4,
        "topk": query_chunk * (2 * k) * (4 + 8) + query_chunk * k * num_values * 4,
    }


@torch.no_grad()
def topk_cosine(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    query_chunk: int | None = None,
    key_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k keys of largest inner product with each query, best first, searched in chunks.

    Args:
        queries: (Q, D) L2-normalised queries, any float dtype, on the search device.
        keys: (M, D) L2-normalised keys on the search device (or on the CPU: each chunk is then
            copied to the queries' device), in the dtype the products are computed in.
        k: neighbours per query, 1 <= k <= M.

    Returns:
        ``(sims (Q, k) float32, indices (Q, k) int64)`` on the queries' device.
    """
    if not 1 <= k <= len(keys):
        raise ValueError(f"k={k} must be between 1 and the number of keys {len(keys)}")
    device = queries.device
    qc, kc = default_chunks(device)
    qc, kc = query_chunk or qc, key_chunk or kc
    sims_out, idx_out = [], []
    for q0 in range(0, len(queries), qc):
        q = queries[q0 : q0 + qc].to(keys.dtype)
        best_s = torch.empty(len(q), 0, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=device)
        for k0 in range(0, len(keys), kc):
            block = keys[k0 : k0 + kc].to(device, non_blocking=True)
            s, i = (q @ block.T).float().topk(min(k, len(block)), dim=1)
            merged_s = torch.cat([best_s, s], 1)
            best_s, order = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
            best_i = torch.cat([best_i, i + k0], 1).gather(1, order)
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out), torch.cat(idx_out)


class FaissIndex:
    """Exact inner-product search with faiss (``IndexFlatIP``; on the GPU where faiss supports it)."""

    def __init__(self, keys: torch.Tensor, chunk: int = 1 << 20):
        import faiss  # optional dependency; checked by check_backend

        dim = keys.shape[1]
        index = faiss.IndexFlatIP(dim)
        if keys.is_cuda and hasattr(faiss, "StandardGpuResources"):
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, keys.device.index or 0, index)
        for i in range(0, len(keys), chunk):  # float32 copies one chunk at a time
            index.add(keys[i : i + chunk].float().cpu().numpy())
        self.index = index

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sims (Q, k), indices (Q, k))`` on the queries' device."""
        sims, idx = self.index.search(queries.float().cpu().numpy(), k)
        return torch.from_numpy(sims).to(queries.device), torch.from_numpy(idx).to(queries.device)


def normalise_into(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write L2-normalised ``rows`` (computed in fp32) into ``out`` in ``out``'s dtype; returns ``out``."""
    out.copy_(F.normalize(rows.float(), dim=-1))
    return out
