"""Joint importance-redundancy scoring of cached keys and per-head top-k selection (R-KV as used by FlowCache).

All tensors use SDPA layout: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, L, D]``, v ``[B, Hkv, L, Dv]``, with ``Hq = G * Hkv``
and query head ``h`` attending with kv head ``h // G`` (torch SDPA ``enable_gqa`` / ``repeat_interleave`` convention).
Scores are fp32 ``[B, Hkv, L]``; higher means keep. Every function is pure.

score = λ·I − (1−λ)·R, where
    I = max_pool1d(mean_q softmax_L(max_G(q·kᵀ·scale)))   (importance: attention the recent queries pay each key)
    R = softmax_L((k̂_i · Σ_j k̂_j − 1) / L)                 (redundancy: mean cosine similarity to the other keys)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError

GRANULARITIES = ("token", "frame", "chunk")


@dataclass
class CompressionConfig:
    """Settings of the KV scoring.

    mix_lambda:        weight of importance in ``λ·I − (1−λ)·R``. 0.07 is the R-KV code default and the value in
                       every FlowCache config (MAGI-1 and SkyReels-V2); the R-KV paper text says 0.1.
    pool_kernel:       odd width of the sliding max-pool over keys applied to importance (stride 1, same padding).
                       7 as in R-KV and both FlowCache ports.
    query_granularity: which queries judge importance. "token": the last ``tail_tokens`` queries (R-KV style
                       observation window); "frame": the last ``tokens_per_frame`` queries, i.e. the last latent frame
                       of the chunk (FlowCache MAGI option, 2025 tokens at 720x720); "chunk": all queries of the chunk
                       (what FlowCache SkyReels-V2 does). Default "frame": cheaper than "chunk", which materialised
                       ~12 GB of logits in the MAGI code, while still seeing a whole frame.
    tail_tokens:       query count for "token"; 50 as in FlowCache MAGI (R-KV itself uses an 8-token window).
    query_block:       most queries whose logits exist at once; bounds the logits to
                       ``[B, Hq, query_block, L]`` (fp32). 1024 is our choice, not from the sources.
    """

    mix_lambda: float = 0.07
    pool_kernel: int = 7
    query_granularity: str = "frame"
    tail_tokens: int = 50
    query_block: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_lambda <= 1.0:
            raise InputError(f"CompressionConfig.mix_lambda={self.mix_lambda}: must lie in [0, 1].")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise InputError(f"CompressionConfig.pool_kernel={self.pool_kernel}: must be a positive odd number.")
        if self.query_granularity not in GRANULARITIES:
            raise InputError(
                f"CompressionConfig.query_granularity={self.query_granularity!r}: must be one of {GRANULARITIES}."
            )
        if self.tail_tokens < 1:
            raise InputError(f"CompressionConfig.tail_tokens={self.tail_tokens}: must be at least 1.")
        if self.query_block < 1:
            raise InputError(f"CompressionConfig.query_block={self.query_block}: must be at least 1.")


def select_queries(q: torch.Tensor, cfg: CompressionConfig, tokens_per_frame: int | None = None) -> torch.Tensor:
    """Queries that judge importance.

    q:  [B, Hq, Lq, D] queries of the chunk (post-RoPE), raster order with the last frame last
    ->  [B, Hq, Lsel, D], a view; Lsel = min(Lq, tail_tokens | tokens_per_frame | Lq)
    """
    if cfg.query_granularity == "chunk":
        return q
    if cfg.query_granularity == "token":
        n = cfg.tail_tokens
    else:
        if tokens_per_frame is None or tokens_per_frame < 1:
            raise InputError(f"query_granularity='frame' needs tokens_per_frame >= 1, got {tokens_per_frame}.")
        n = tokens_per_frame
    return q[:, :, -n:]


def redundancy(k: torch.Tensor) -> torch.Tensor:
    """Softmax over tokens of each key's mean cosine similarity to the other keys, in O(L·D).

    k:  [B, Hkv, L, D]
    ->  [B, Hkv, L] fp32, sums to 1 over L

    Uses Σ_{j≠i} k̂_i·k̂_j = k̂_i·Σ_j k̂_j − 1; exact up to the 1e-8 norm epsilon (an all-zero key gets −1/L where the
    dense formula gives 0).
    """
    k = k.float()
    L = k.shape[-2]
    kn = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    total = kn.sum(dim=-2, keepdim=True)  # [B, Hkv, 1, D]
    mean_sim = ((kn * total).sum(dim=-1) - 1.0) / L
    return mean_sim.softmax(dim=-1)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> int:
    """Validate shapes; returns the group size G = Hq // Hkv."""
    if q.dim() != 4 or k.dim() != 4:
        raise InputError(f"q and k must be [B, H, L, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}.")
    (b, hq, lq, d), (bk, hkv, _, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise InputError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim.")
    if hq % hkv != 0:
        raise InputError(f"query heads ({hq}) must be a multiple of kv heads ({hkv}).")
    if lq < 1:
        raise InputError("importance needs at least one query.")
    return hq // hkv


def _logits_block(q_blk: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA logits of one query block, max-pooled over each group's query heads.

    q_blk: [B, Hq, n, D] fp32;  k: [B, Hkv, L, D] fp32
    ->     [B, Hkv, n, L]
    """
    b, hq, n, d = q_blk.shape
    hkv = k.shape[1]
    qg = q_blk.reshape(b, hkv, hq // hkv, n, d)  # head h -> (h // G, h % G)
    logits = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, n, L]
    return logits.amax(dim=2)


def _pool_keys(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Sliding max over the key axis, same length. x: [B, Hkv, L]."""
    if kernel == 1:
        return x
    return F.max_pool1d(x, kernel_size=kernel, stride=1, padding=kernel // 2)


def importance(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    query_block: int = 1024,
    pool_kernel: int = 7,
) -> torch.Tensor:
    """Attention each key receives from the queries, averaged over queries and max-pooled along keys.

    q:  [B, Hq, Lq, D], Hq = G·Hkv
    k:  [B, Hkv, L, D]
    scale: logit scale, default 1/sqrt(D)
    ->  [B, Hkv, L] fp32

    At most ``[B, Hq, query_block, L]`` logits exist at once: softmax rows are summed block by block.
    """
    _check_qk(q, k)
    if query_block < 1:
        raise InputError(f"query_block={query_block}: must be at least 1.")
    if pool_kernel < 1 or pool_kernel % 2 == 0:
        raise InputError(f"pool_kernel={pool_kernel}: must be a positive odd number.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.float()
    lq = q.shape[2]
    acc = torch.zeros(k.shape[:3], dtype=torch.float32, device=k.device)
    for start in range(0, lq, query_block):
        logits = _logits_block(q[:, :, start:start + query_block].float(), k, scale)
        acc += logits.softmax(dim=-1).sum(dim=-2)
        del logits
    return _pool_keys(acc / lq, pool_kernel)


def score(
    q: torch.Tensor, k: torch.Tensor, cfg: CompressionConfig, tokens_per_frame: int | None = None
) -> torch.Tensor:
    """Keep-score λ·I − (1−λ)·R of every cached key.

    q:  [B, Hq, Lq, D] queries of the chunk just forwarded;  k: [B, Hkv, L, D] candidate keys
    ->  [B, Hkv, L] fp32
    """
    qs = select_queries(q, cfg, tokens_per_frame)
    imp = importance(qs, k, query_block=cfg.query_block, pool_kernel=cfg.pool_kernel)
    return cfg.mix_lambda * imp - (1.0 - cfg.mix_lambda) * redundancy(k)


def select_topk(
    k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, budget: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``budget`` best-scored tokens of each kv head, in their original order.

    k: [B, Hkv, L, D];  v: [B, Hkv, L, Dv];  scores: [B, Hkv, L]
    -> k_kept [B, Hkv, n, D], v_kept [B, Hkv, n, Dv], index [B, Hkv, n] int64 ascending per head;
       n = min(budget, L). When L <= budget, k and v come back as they are and index is arange(L).
    """
    if budget < 1:
        raise InputError(f"KV budget={budget}: must keep at least one token.")
    b, h, L, d = k.shape
    if v.shape[:3] != k.shape[:3] or scores.shape != k.shape[:3]:
        raise InputError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and scores {tuple(scores.shape)} disagree.")
    if L <= budget:
        return k, v, torch.arange(L, device=k.device).expand(b, h, L)
    # Sorting keeps the kept tokens in cache (time/raster) order, which positional bookkeeping relies on.
    index = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
    k_kept = k.gather(2, index.unsqueeze(-1).expand(b, h, budget, d))
    v_kept = v.gather(2, index.unsqueeze(-1).expand(b, h, budget, v.shape[-1]))
    return k_kept, v_kept, index


def compress(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    budget: int,
    cfg: CompressionConfig,
    tokens_per_frame: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score the cached keys and keep ``budget`` tokens per kv head; see ``score`` and ``select_topk``."""
    if k.shape[2] <= budget:
        return select_topk(k, v, torch.empty(k.shape[:3], device=k.device), budget)
    return select_topk(k, v, score(q, k, cfg, tokens_per_frame), budget)
