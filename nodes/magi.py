"""MAGI-1's own text encoder (T5-v1.1-XXL + MAGI's special tokens) and ViT VAE, as ComfyUI nodes."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..flowcache.errors import CheckpointError, FlowCacheError, InputError, led_by
from ..flowcache.models.magi_vae import MagiVAECodec, load_magi_vae
from ..flowcache.text import (SPECIAL_TOKENS_FILENAME, SPECIAL_TOKENS_HELP, MagiSpecialTokens, T5Tokenizer,
                              encode_magi_prompt, find_magi_special_tokens, load_magi_special_tokens,
                              load_t5_encoder, magi_chunk_captions)
from . import comfy_bridge
from .comfy_v3 import FLOWCACHE_MAGI_VAE, check_choices, io

log = logging.getLogger("FlowCache")

TOKENS_KEY = "flowcache_magi_special_tokens"  # where the text node leaves the special tokens in CONDITIONING


def magi_caption(cond: Any, name: str, width: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CONDITIONING -> MAGI-1's per-chunk captions ``([1, chunks, L, width], [1, chunks, L])``.

    From FlowCache MAGI-1 Text Encode the states carry their mask and special tokens, and every chunk gets
    ``[DURATION, HQ, caption]`` as MAGI-1 builds it. Other T5-XXL conditioning is used as it is (no special
    tokens, every row valid), which MAGI-1 allows but its official runs never do.
    """
    try:
        states, extra = cond[0][0], cond[0][1]
    except (TypeError, IndexError, KeyError):
        states, extra = None, None
    if not isinstance(states, torch.Tensor) or not isinstance(extra, dict):
        raise InputError(f"{name}: expected CONDITIONING from FlowCache MAGI-1 Text Encode, got {type(cond).__name__}.")
    if states.dim() != 3 or states.shape[0] != 1 or states.shape[-1] != width:
        raise InputError(f"{name}: MAGI-1 takes T5-XXL states [1, tokens, {width}]; got {list(states.shape)}. "
                         "Use FlowCache MAGI-1 Text Encode.")
    mask = extra.get("attention_mask")
    mask = torch.ones(states.shape[:2], dtype=torch.long) if mask is None else mask.reshape(1, -1)
    tokens = extra.get(TOKENS_KEY)
    if tokens is None:
        log.warning("FlowCache: %s has no MAGI-1 special tokens (not from FlowCache MAGI-1 Text Encode); the "
                    "captions go in without the HQ/duration tokens.", name)
    return magi_chunk_captions(states.float().cpu(), mask.cpu(), chunks, tokens)


def _tokenizer_json() -> Path:
    """ComfyUI ships the T5 v1.1 tokenizer; MAGI-1 uses the same vocabulary."""
    root = comfy_bridge.comfy_package_dir()
    if root is None:
        raise CheckpointError("FlowCache MAGI-1 Text Encode: expected ComfyUI's T5 tokenizer "
                              "(comfy/text_encoders/t5_tokenizer/tokenizer.json); ComfyUI was not found.")
    return root / "text_encoders" / "t5_tokenizer" / "tokenizer.json"


class FlowCacheMagiTextEncode(io.ComfyNode):
    """Encode a prompt for MAGI-1: T5-v1.1-XXL states at length 800, plus MAGI's special tokens."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheMagiTextEncode", display_name="FlowCache MAGI-1 Text Encode", category="FlowCache/MAGI-1",
            description=f"T5-XXL text encoder for MAGI-1. Needs MAGI-1's special tokens: {SPECIAL_TOKENS_FILENAME} "
                        "in models/text_encoders.",
            inputs=[
                io.Combo.Input("t5_name", options=comfy_bridge.filename_list("text_encoders"),
                               tooltip="T5-v1.1-XXL from models/text_encoders: t5xxl_fp16.safetensors or "
                                       "t5xxl_fp8_e4m3fn.safetensors, the files Flux and SD3 use."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What the video shows. MAGI-1 cleans the text (lower case, no URLs) and "
                                        "reads up to 800 tokens."),
            ],
            outputs=[io.Conditioning.Output(
                tooltip="MAGI-1 text conditioning (with its mask and special tokens), for FlowCache Sampler.")])

    @classmethod
    def validate_inputs(cls, t5_name: str) -> bool | str:
        return check_choices(cls, t5_name=t5_name)

    @classmethod
    def execute(cls, t5_name: str, prompt: str) -> io.NodeOutput:
        path = comfy_bridge.full_path("text_encoders", t5_name)
        if path is None:
            raise CheckpointError(f"t5_name: {t5_name} was not found in models/text_encoders.")
        tokens_path = find_magi_special_tokens(comfy_bridge.folder_paths_of("text_encoders"))
        if tokens_path is None:
            raise CheckpointError(f"MAGI-1 special tokens: no {SPECIAL_TOKENS_FILENAME} in models/text_encoders. "
                                  f"{SPECIAL_TOKENS_HELP}")
        special: MagiSpecialTokens = load_magi_special_tokens(tokens_path)
        device = comfy_bridge.text_encoder_device()
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        try:
            encoder = load_t5_encoder(path, dtype, device)
        except FlowCacheError as e:
            raise led_by("t5_name", e) from e
        try:
            states, mask = encode_magi_prompt(prompt, encoder, T5Tokenizer(_tokenizer_json()))
        finally:
            del encoder
            comfy_bridge.soft_empty_cache()
        return io.NodeOutput([[states.cpu(), {"attention_mask": mask.cpu(), TOKENS_KEY: special,
                                              "pooled_output": None}]])


class FlowCacheMagiVAELoader(io.ComfyNode):
    """Load MAGI-1's ViT VAE (8x spatial, 4x temporal, 16 channels)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCacheMagiVAELoader", display_name="FlowCache Load MAGI-1 VAE", category="FlowCache/MAGI-1",
            description="Loads MAGI-1's own VAE; decoding tiles the video as MAGI-1 does.",
            inputs=[io.Combo.Input(
                "vae_name", options=comfy_bridge.filename_list("vae"),
                tooltip="MAGI-1's VAE from models/vae (the release's ckpt/vae/diffusion_pytorch_model.safetensors, "
                        "e.g. renamed magi1_vae.safetensors).")],
            outputs=[FLOWCACHE_MAGI_VAE.Output(
                display_name="magi_vae",
                tooltip="MAGI-1's VAE, for FlowCache Decode, FlowCache Decode & Save Video and prefix images.")])

    @classmethod
    def validate_inputs(cls, vae_name: str) -> bool | str:
        return check_choices(cls, vae_name=vae_name)

    @classmethod
    def execute(cls, vae_name: str) -> io.NodeOutput:
        path = comfy_bridge.full_path("vae", vae_name)
        if path is None:
            raise CheckpointError(f"vae_name: {vae_name} was not found in models/vae.")
        device = comfy_bridge.vae_device()
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # MAGI-1 runs its VAE in bf16
        try:
            vae = load_magi_vae(path, dtype)
        except FlowCacheError as e:
            raise led_by("vae_name", e) from e
        return io.NodeOutput(MagiVAECodec(vae.to(device), device=device))


def magi_scheduled_captions(prompts: Any, width: int, plan: Any, settings: Any, temporal_stride: int
                            ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """FlowCache Prompt Schedule's prompts -> MAGI-1's per-chunk captions ``([1, chunks, L, width], [1, chunks, L])``
    and the switch records: chunk c takes the prompt that holds at its first latent frame (c · chunk_width, the
    latent's frames counted from its start). Each prompt is built as ``magi_caption`` builds one (its special
    tokens, if any); prompts of different lengths are padded to the longest, the padding masked out."""
    from ..flowcache.prompts import switch_record

    prompts.check(settings.num_frames, temporal_stride)
    built = []
    for i, entry in enumerate(prompts.entries):
        extra = prompts.extras[i] if i < len(prompts.extras) else {}
        built.append(magi_caption([[entry.states, extra]], f"prompts entry {i + 1}", width, plan.chunk_num))
    longest = max(c.shape[2] for c, _ in built)
    caps, masks = [], []
    for c, m in built:
        pad = longest - c.shape[2]
        caps.append(torch.nn.functional.pad(c, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(m.long(), (0, pad)))
    caption = torch.empty_like(caps[0])
    mask = torch.empty_like(masks[0])
    switches, current = [], 0
    for chunk in range(plan.chunk_num):
        entry = prompts.entry_at(chunk * settings.chunk_width)
        caption[:, chunk], mask[:, chunk] = caps[entry][:, chunk], masks[entry][:, chunk]
        if entry != current:
            switches.append(switch_record(chunk, chunk * settings.chunk_width, entry, "chunk", temporal_stride))
            current = entry
    return caption, mask, switches
