"""Pieces shared by the model definitions: the KV-context protocols that chunk forwards talk to, and the
layer operations a model is built from (torch's own, or a host's, e.g. ComfyUI's casting layers)."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn
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


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_BACKEND: ContextVar[AttentionFn | None] = ContextVar("flowcache_attention", default=None)


@contextlib.contextmanager
def attention_backend(fn: AttentionFn | None) -> Iterator[None]:
    """Route every ``attention`` call made inside the block (this thread or task only) to ``fn(q, k, v, mask)``
    with ``attention``'s shapes; None keeps the default. How a host supplies its own kernel for one run."""
    token = _BACKEND.set(fn)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention, [B, Hq, Lq, D] x [B, Hkv, Lk, D] -> [B, Hq, Lq, D]; GQA when Hq > Hkv.
    torch's SDPA unless ``attention_backend`` routes it elsewhere."""
    backend = _BACKEND.get()
    if backend is not None:
        return backend(q, k, v, mask)
    if q.shape[1] != k.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ------------------------------------------------------------------------------------- layer operations

FP8_DTYPES = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)


class TorchLayers:
    """torch's own layer classes (``RMSNorm``: the model file's own, set by ``flowcache.models.wan``).

    A layer namespace is what a model's constructor builds its layers from: ``Linear``, ``Conv3d``,
    ``LayerNorm``, ``RMSNorm`` and ``Embedding``, each taking torch's constructor arguments."""

    Linear = nn.Linear
    Conv3d = nn.Conv3d
    LayerNorm = nn.LayerNorm
    Embedding = nn.Embedding
    RMSNorm: type = nn.RMSNorm  # replaced by Wan's reference RMSNorm when flowcache.models.wan is imported


@dataclass(frozen=True)
class Operations:
    """Where a model's layers come from: the core builds its modules from ``layers(hold, compute)``, a layer
    namespace (see ``TorchLayers``) for weights held in ``hold`` and inputs arriving in ``compute``.

    casts: the layers cast their weights to the input's dtype and device at every call. Then weights may stay
        in a storage dtype (fp8 checkpoints stay fp8 in memory and are upcast layer by layer) or on another
        device (a host's partial loading). torch's own layers do not, so with ``TORCH_OPERATIONS`` the core
        converts every weight to the compute dtype when it loads the model.
    name: shown in logs and ``describe()``.
    """

    layers: Callable[[torch.dtype, torch.dtype], Any]
    casts: bool = False
    name: str = "torch"


TORCH_OPERATIONS = Operations(lambda hold, compute: TorchLayers, casts=False, name="torch")


def held(p: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A raw parameter (one a layer does not own, e.g. a block's ``modulation``) in ``dtype`` on ``device``.

    A host may leave such parameters where they are stored (partial loading moves only layers) or hold them
    as a tensor subclass (a quantized-model pack's), so they are converted at use, as a plain tensor."""
    if type(p) not in (torch.Tensor, nn.Parameter):
        p = p.as_subclass(torch.Tensor)
    return p.to(device=device, dtype=dtype)
