"""Analytic FLOPs of a Wan-architecture forward, in the paper's accounting (2 FLOPs per multiply-add).

Per layer, for T query tokens attending to K keys, with S text tokens, model dim d and FFN width f:
    linear      8·T·d² (self q,k,v,o) + 4·T·d² (cross q,o) + 4·S·d² (cross k,v) + 4·T·d·f (FFN)
    attention   4·T·K·d (self: scores and values) + 4·T·S·d (cross)
For SkyReels-V2-DF-1.3B at 540P this gives 420.8 TFLOPs for a forward of all 5 chunks of 10,200 tokens
with block-causal context (chunk j sees j chunks), which is how the paper counts its vanilla row.
"""
from __future__ import annotations


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
