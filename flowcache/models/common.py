"""Pieces shared by the model definitions: the KV-context protocols that chunk forwards talk to."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class KVContext(Protocol):
    """What one chunk forward's self-attention reads and writes, layer by layer.

    A model never owns a cache: the pipeline passes an object with this method, so that the same model
    runs a whole window (no context), a chunk with plain history, or a chunk with a compressing store.
    """

    def extend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's keys/values for ``layer`` and return what its queries attend to.

        q: [B, Hq, Lq, D]; k, v: [B, Hkv, L, D], after RoPE at absolute positions.
        Returns (keys, values) [B, Hkv, L_ctx + L, D]: the stored context of earlier chunks, then k, v.
        ``q`` is passed so that a compressing store can score the context with the current queries.
        """
        ...


class ChunkAttention(Protocol):
    """The self-attention of a chunkwise forward (Wan): the pipeline passes an object that stores the chunks'
    keys/values and attends each chunk's queries to its context, so a model never owns a cache."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, H, L, D] (after RoPE) of one or more chunks laid end to end -> outputs [B, H, L, D]."""
        ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, [B, Hq, Lq, D] x [B, Hkv, Lk, D] -> [B, Hq, Lq, D]; GQA when Hq > Hkv."""
    if q.shape[1] != k.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
