"""Dense O(L²) references of the KV scores (``flowcache.kv.scoring``), written the direct way: every logit and every
cosine at once. The pack's scores are computed blockwise and in O(L); the tests compare the two."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def redundancy_dense(k: torch.Tensor) -> torch.Tensor:
    """k [B, Hkv, L, D] -> [B, Hkv, L]: cosine matrix, zero diagonal, row mean over L, softmax over L."""
    k = k.float()
    L = k.shape[-2]
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    sim = kn @ kn.transpose(-1, -2)
    sim = sim * (1.0 - torch.eye(L, dtype=sim.dtype, device=sim.device))
    return sim.mean(dim=-1).softmax(dim=-1)


def importance_dense(q: torch.Tensor, k: torch.Tensor, scale: float | None = None, pool_kernel: int = 7) -> torch.Tensor:
    """q [B, Hq, Lq, D], k [B, Hkv, L, D] -> [B, Hkv, L]: all logits at once (kv heads repeated to the query
    heads), max over a kv head's query group, softmax over the keys, mean over the queries, sliding max."""
    b, hq, lq, d = q.shape
    hkv, L = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = q.float() @ k.float().repeat_interleave(g, dim=1).transpose(-1, -2) * scale  # [B, Hq, Lq, L]
    logits = logits.reshape(b, hkv, g, lq, L).amax(dim=2)
    out = logits.softmax(dim=-1).mean(dim=-2)
    if pool_kernel == 1:
        return out
    return F.max_pool1d(out, kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2)
