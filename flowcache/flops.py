"""Analytic FLOPs of a Wan-architecture or MAGI-1 forward, in the paper's accounting (2 FLOPs per multiply-add).

Per layer, for T query tokens attending to K keys, with S text tokens, model dim d and FFN width f:
    linear      8·T·d² (self q,k,v,o) + 4·T·d² (cross q,o) + 4·S·d² (cross k,v) + 4·T·d·f (FFN)
    attention   4·T·K·d (self: scores and values) + 4·T·S·d (cross)
For SkyReels-V2-DF-1.3B at 540P this gives 420.8 TFLOPs for a forward of all 5 chunks of 10,200 tokens
with block-causal context (chunk j sees j chunks), which is how the paper counts its vanilla row.
MAGI-1 (``magi_forward_flops``) has grouped-query K/V, a gated FFN and a narrower cross-attention.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models.magi import MagiConfig


def forward_flops(tokens: int, context: int, dim: int, ffn: int, layers: int, text_len: int) -> float:
    """FLOPs of one forward of ``tokens`` queries over ``context`` self-attention keys."""
    t, k, d, s = float(tokens), float(context), float(dim), float(text_len)
    linear = 8 * t * d * d + 4 * t * d * d + 4 * s * d * d + 4 * t * d * ffn
    attn = 4 * t * k * d + 4 * t * s * d
    return layers * (linear + attn)


def text_projection_flops(dim: int, layers: int, text_len: int) -> float:
    """The cross-attention key/value projections of the text in one forward (part of ``forward_flops``): what a
    loop that computes them once per run saves on every later forward."""
    return layers * 4.0 * text_len * dim * dim


def paper_window_flops(tokens_per_chunk: int, chunks: int, dim: int, ffn: int, layers: int, text_len: int) -> float:
    """The paper's 'one full-window forward': every chunk forwarded, chunk j attending to j chunks."""
    return sum(forward_flops(tokens_per_chunk, j * tokens_per_chunk, dim, ffn, layers, text_len)
               for j in range(1, chunks + 1))


def magi_forward_flops(cfg: "MagiConfig", tokens: int, context: int, text_tokens: int) -> float:
    """FLOPs of one MAGI-1 forward of ``tokens`` queries over ``context`` self-attention keys and ``text_tokens``
    caption tokens."""
    t, k, s = float(tokens), float(context), float(text_tokens)
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    linear = (2 * t * d * (2 * q + 2 * kv) + 2 * t * 2 * q * d + 2 * t * d * f * (2 if cfg.gated_linear_unit else 1)
              + 2 * t * f * d + 2 * s * cfg.xattn_dim * 2 * kv)
    attn = 4 * t * k * q + 4 * t * s * q
    return cfg.num_layers * (linear + attn)
