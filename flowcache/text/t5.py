"""T5 v1.1 encoder (MAGI-1's text encoder) that reads the T5-XXL files ComfyUI users already have.

MAGI-1 encodes prompts with ``transformers.T5EncoderModel`` (``t5-v1_1-xxl``) in fp32, tokenised to exactly 800
tokens (``padding="max_length"``, truncation, ``</s>`` appended) with the attention mask, and keeps
``last_hidden_state`` [1, 800, 4096] plus the mask (MAGI-1 ``inference/model/t5/t5_model.py``). This module is a
plain-PyTorch re-derivation of that encoder:

* weights: HF key names (``encoder.block.N.layer.0.SelfAttention.q.weight``, ``shared.weight``, ...), as in
  ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` (ComfyUI's Flux/SD3 files) and in HF folders;
  any prefix (``text_encoders.t5xxl.transformer.`` in bundled checkpoints) is stripped; ComfyUI's
  ``*_scaled.safetensors`` fp8 files (``X.scale_weight`` next to ``X.weight``) are de-scaled. Weights stay in
  their stored dtype and are upcast per layer to the compute dtype, so fp8 files take ~5 GB of RAM, fp16 ~9.5 GB.
* config from shapes: d_model, inner dim, d_ff, layer count, heads and buckets (from the relative-attention
  table [buckets, heads]), gated-GELU (v1.1, ``wi_0``/``wi_1``) or ReLU (original T5, ``wi``).
* math: RMS LayerNorm (no mean, no bias, eps 1e-6, variance in fp32), attention without 1/sqrt(d) scaling, a
  bucketed relative-position bias computed once in block 0 and shared by all blocks, bidirectional buckets
  (32 buckets, max distance 128), padding keys masked with the dtype's lowest value, softmax in fp32,
  gated GELU (tanh approximation) feed-forward, final RMS norm. In fp16 compute, hidden states are clamped
  the way HF does it to avoid inf.

Padding does not change the outputs of the real tokens (masked keys get zero weight; the relative bias depends on
distances only). MAGI's DiT reads only mask=1 rows (masked_select into varlen cross-attention), so by default
``encode`` runs only the real tokens and leaves the padded rows zero; ``full=True`` runs all 800 like the
reference (identical real rows, up to float rounding).

The tokenizer is the ``tokenizers`` library reading a ``tokenizer.json`` (ComfyUI ships the T5 v1.1 one at
``comfy/text_encoders/t5_tokenizer/tokenizer.json``); it is imported only when a tokenizer is made.

Never imports ComfyUI.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError, InputError

MAGI_TEXT_LENGTH = 800
ANCHOR = "encoder.final_layer_norm.weight"
_FP8 = tuple(t for t in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if t is not None)


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    gated: bool = True           # v1.1: gated GELU (wi_0, wi_1); original T5: ReLU (wi)
    eps: float = 1e-6

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- modules
class CastLinear(nn.Module):
    """A bias-free linear whose weight stays in its stored dtype (fp16/bf16/fp8) and is cast to the input's
    dtype at call time; ``scale`` de-scales ComfyUI's scaled-fp8 weights."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.register_buffer("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if self.scale is not None:
            w = w * self.scale.to(x.dtype)
        return F.linear(x, w)


class T5RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        y = (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)
        return self.weight.to(x.dtype) * y


def relative_position_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bidirectional bucketing of ``key - query`` distances: half the buckets per direction, exact for
    small distances, logarithmic up to ``max_distance``, saturating beyond."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    # log-spaced buckets for exact <= dist < max_distance; clamp(min=1) only guards log(0) in the unused branch
    far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


class T5SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = CastLinear(cfg.d_model, inner)
        self.k = CastLinear(cfg.d_model, inner)
        self.v = CastLinear(cfg.d_model, inner)
        self.o = CastLinear(inner, cfg.d_model)
        self.cfg = cfg
        if has_bias_table:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)
            self.relative_attention_bias.weight.requires_grad_(False)

    def position_bias(self, L: int, device, dtype) -> torch.Tensor:
        pos = torch.arange(L, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        table = self.relative_attention_bias.weight.to(dtype)
        return table[buckets].permute(2, 0, 1)[None]  # [1, H, Lq, Lk]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, L, self.heads, self.d_kv).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # T5: no 1/sqrt(d) scaling
        w = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(w, v).transpose(1, 2).reshape(B, L, self.heads * self.d_kv)
        return self.o(out)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias_table: bool):
        super().__init__()
        self.SelfAttention = T5SelfAttention(cfg, has_bias_table)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.eps)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = CastLinear(cfg.d_model, cfg.d_ff)
        self.wi_1 = CastLinear(cfg.d_model, cfg.d_ff)
        self.wo = CastLinear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5DenseActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = CastLinear(cfg.d_model, cfg.d_ff)
        self.wo = CastLinear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg) if cfg.gated else T5DenseActDense(cfg)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.eps)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float16 and not torch.isfinite(x).all():
        big = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-big, big)
    return x


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, index: int):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias_table=index == 0), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        att, ff = self.layer[0], self.layer[1]
        x = _clamp_fp16(x + att.SelfAttention(att.layer_norm(x), bias))
        return _clamp_fp16(x + ff.DenseReluDense(ff.layer_norm(x)))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, i) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5RMSNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """HF-layout T5 encoder: ``shared``, ``encoder.block.N.layer.{0,1}...``, ``encoder.final_layer_norm``."""

    def __init__(self, cfg: T5Config, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.shared.weight.requires_grad_(False)
        self.encoder = T5Stack(cfg)

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] -> last_hidden_state [B, L, d_model] in the compute dtype."""
        if input_ids.dim() != 2:
            raise InputError(f"T5: input_ids must be [B, L], got {tuple(input_ids.shape)}.")
        dt = self.compute_dtype
        if not dt.is_floating_point or dt in _FP8:
            raise InputError(f"T5 compute dtype {dt} is not usable; use float32, bfloat16 or float16.")
        ids = input_ids.to(self.device)
        x = F.embedding(ids, self.shared.weight).to(dt)
        x = torch.nan_to_num(x)
        L = ids.shape[1]
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(L, x.device, dt)
        if attention_mask is not None:
            m = attention_mask.to(self.device)
            if m.shape != ids.shape:
                raise InputError(f"T5: attention_mask {tuple(m.shape)} does not match input_ids {tuple(ids.shape)}.")
            bias = bias + (1.0 - m[:, None, None, :].to(dt)) * torch.finfo(dt).min
        for blk in self.encoder.block:
            x = blk(x, bias)
        return self.encoder.final_layer_norm(x)


# --------------------------------------------------------------------------------------------- config and loading
def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for k in sd:
        if k.endswith(ANCHOR):
            pre = k[: -len(ANCHOR)]
            return {kk[len(pre):]: v for kk, v in sd.items() if kk.startswith(pre)} if pre else sd
    return sd


def t5_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> T5Config:
    emb_key = "shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight"
    att = "encoder.block.0.layer.0.SelfAttention."
    need = [ANCHOR, emb_key, att + "q.weight", att + "relative_attention_bias.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        hint = ""
        if any(k.startswith(("text_model.", "transformer.text_model.")) for k in sd):
            hint = " This looks like a CLIP text encoder."
        elif any(k.startswith("model.layers.") for k in sd):
            hint = " This looks like an LLM (Llama/Qwen-style) text encoder."
        elif any("x_embedder" in k or "videodit_blocks" in k for k in sd):
            hint = " This is a MAGI-1 DiT checkpoint."
        raise CheckpointError(
            f"{source}: not a T5 encoder: missing {', '.join(missing)}.{hint} Use a T5-v1.1-XXL file in Hugging "
            "Face key layout, e.g. ComfyUI's t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors (keys like "
            "'encoder.block.0.layer.0.SelfAttention.q.weight').")
    vocab, d_model = sd[emb_key].shape
    inner = sd[att + "q.weight"].shape[0]
    buckets, heads = sd[att + "relative_attention_bias.weight"].shape
    if inner % heads:
        raise CheckpointError(f"{source}: attention width {inner} does not split into {heads} heads.")
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.") and k.split(".")[2].isdigit())
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in sd
    if not gated and ff + "wi.weight" not in sd:
        raise CheckpointError(f"{source}: no feed-forward weights ({ff}wi_0/wi_1 or wi) in block 0.")
    d_ff = sd[ff + ("wi_0.weight" if gated else "wi.weight")].shape[0]
    if any(k.startswith("encoder.block.1.layer.0.SelfAttention.relative_attention_bias") for k in sd):
        raise CheckpointError(f"{source}: every block has its own relative-attention table (UMT5); MAGI-1 uses "
                              "T5 v1.1 XXL with one shared table.")
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads, d_ff=d_ff,
                    num_layers=layers, num_buckets=buckets, gated=gated)


def build_t5_encoder(sd: dict[str, torch.Tensor], source: str = "checkpoint",
                     compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                     keep_storage_dtype: bool = True) -> T5Encoder:
    """A T5Encoder from HF-layout tensors. Linear weights keep their stored dtype (cast per call) unless
    ``keep_storage_dtype`` is False; norms, the embedding and the bias table are held in the compute dtype
    (fp8 upcast; fp8 files store some norms in fp8 too)."""
    sd = _strip_prefix(sd)
    if ANCHOR not in sd:
        t5_config_from_state_dict(sd, source)  # raises, saying what the file looks like
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "shared.")) and "decoder" not in k}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.pop("encoder.embed_tokens.weight", None)
    cfg = t5_config_from_state_dict(sd, source)
    scales = {k[: -len(".scale_weight")]: v for k, v in sd.items() if k.endswith(".scale_weight")}
    sd = {k: v for k, v in sd.items() if not k.endswith((".scale_weight", ".scale_input"))}
    with torch.device("meta"):
        model = T5Encoder(cfg, compute_dtype)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith(".scale")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(expected) & set(sd) if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:4])})")
        if wrong:
            parts.append("wrong shape: " + ", ".join(f"{k} {tuple(sd[k].shape)} != {tuple(expected[k])}"
                                                      for k in wrong[:3]))
        raise CheckpointError(f"{source}: does not match the T5 encoder layout: " + "; ".join(parts) + ".")
    model = model.to_empty(device=device)
    for name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            key = f"{name}.{pname}" if name else pname
            t = sd[key]
            linear = isinstance(module, CastLinear)
            if linear and keep_storage_dtype and t.is_floating_point():
                data = t
            else:
                data = t.to(compute_dtype)
            module._parameters[pname] = nn.Parameter(data.to(device), requires_grad=False)
        if isinstance(module, CastLinear):
            s = scales.get(name)
            module.scale = s.float().to(device) if s is not None else None
    return model.eval()


def load_t5_encoder(path: str | os.PathLike, compute_dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> T5Encoder:
    """Load a T5 encoder file or HF folder (``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``,
    ``t5xxl_fp8_e4m3fn_scaled.safetensors``, or ``pytorch_model*.bin`` shards read with weights_only).

    compute_dtype: fp32 is what MAGI-1 runs (on CPU in its 4.5B configs); bf16 on a GPU is the practical choice.
    """
    p = Path(path)
    if p.is_dir() and not list(p.glob("*.safetensors")):
        bins = sorted(p.glob("pytorch_model*.bin"))
        if not bins:
            raise CheckpointError(f"{p}: folder holds neither .safetensors nor pytorch_model*.bin files.")
        tensors: dict[str, torch.Tensor] = {}
        for b in bins:
            tensors.update(load_checkpoint(b).tensors)
        return build_t5_encoder(tensors, p.name, compute_dtype, device)
    ck = load_checkpoint(p)
    return build_t5_encoder(ck.tensors, ck.name, compute_dtype, device)


# --------------------------------------------------------------------------------------------- tokenizer
class T5Tokenizer:
    """The T5 v1.1 SentencePiece vocabulary through the ``tokenizers`` library, from a ``tokenizer.json``.

    ``__call__(text, max_length)`` does what MAGI's HF tokenizer call does: ids of the text, truncated to
    ``max_length - 1``, then ``</s>``, then ``<pad>`` up to ``max_length``; mask 1 on text and ``</s>``.
    """

    def __init__(self, tokenizer_json: str | os.PathLike):
        path = Path(tokenizer_json)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json there. ComfyUI ships the T5 v1.1 tokenizer at "
                                  "comfy/text_encoders/t5_tokenizer/tokenizer.json.")
        try:
            from tokenizers import Tokenizer  # lazy: only needed when prompts are encoded
        except ImportError as e:
            raise ImportError("The 'tokenizers' package is needed to tokenise T5 prompts (it comes with every "
                              "ComfyUI install through transformers; otherwise: pip install tokenizers).") from e
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception type
            raise CheckpointError(f"{path.name}: not a readable tokenizer.json ({e}).") from e
        self.path = path
        self.eos_id = self._tok.token_to_id("</s>")
        self.pad_id = self._tok.token_to_id("<pad>")
        if self.eos_id != 1 or self.pad_id != 0:
            raise CheckpointError(f"{path}: not the T5 v1.1 tokenizer (expected <pad> = 0 and </s> = 1, found "
                                  f"{self.pad_id} and {self.eos_id}). Use ComfyUI's "
                                  "comfy/text_encoders/t5_tokenizer/tokenizer.json.")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def ids(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def __call__(self, text: str, max_length: int = MAGI_TEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_ids(self.ids(text), max_length, self.eos_id, self.pad_id)


def pad_ids(ids: Sequence[int], max_length: int = MAGI_TEXT_LENGTH, eos_id: int = 1,
            pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids -> (input_ids [1, max_length], attention_mask [1, max_length]): truncate to max_length - 1,
    append ``</s>``, pad."""
    ids = list(ids)[: max_length - 1] + [eos_id]
    n = len(ids)
    input_ids = torch.full((1, max_length), pad_id, dtype=torch.long)
    input_ids[0, :n] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros((1, max_length), dtype=torch.long)
    mask[0, :n] = 1
    return input_ids, mask


@torch.no_grad()
def encode_ids(encoder: T5Encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids [1, L] + mask -> (states [1, L, d] fp32, mask [1, L]). With ``full=False`` only the real
    tokens run (rows of padding stay zero; MAGI never reads them); ``full=True`` runs all L as MAGI does."""
    if input_ids.shape[0] != 1:
        raise InputError("encode_ids: one prompt at a time (batch 1).")
    L = input_ids.shape[1]
    if full:
        out = encoder(input_ids, attention_mask).float()
    else:
        n = int(attention_mask[0].sum())
        if not bool(attention_mask[0, :n].all()):
            raise InputError("encode_ids: the mask must be 1s then 0s (right padding).")
        out = torch.zeros(1, L, encoder.cfg.d_model, dtype=torch.float32, device=encoder.device)
        if n:
            out[:, :n] = encoder(input_ids[:, :n], attention_mask[:, :n]).float()
    return out, attention_mask.to(out.device)


__all__ = ["T5Config", "T5Encoder", "T5Tokenizer", "load_t5_encoder", "build_t5_encoder",
           "t5_config_from_state_dict", "relative_position_bucket", "pad_ids", "encode_ids", "MAGI_TEXT_LENGTH"]
