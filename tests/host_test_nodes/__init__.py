"""Test-only ComfyUI nodes for tests/test_comfy_native.py. Never shipped: the test links this folder into a
temporary custom_nodes folder of the ComfyUI server it starts.

* FlowCacheTestConditioning: seeded random text states of any width (a real umT5-XXL is 11 GB); its optional
  ``after`` input only orders execution (and makes a prompt differ from a cached one), it does not change
  the tensor.
* FlowCacheTestWeightBudget: a clone of a MODEL (or of FlowCache Load Model's model) that ComfyUI loads with at
  most ``bytes`` of weights on the device. On a CPU ComfyUI always loads models whole (no VRAM to save), so
  this shim passes the budget to ``LoadedModel.model_load``, which then takes ComfyUI's own partial-loading
  (lowvram) path: layers past the budget stay where they are stored and cast, and apply LoRA patches, at use.
* FlowCacheTestAttentionOverride: a clone of a MODEL with an ``optimized_attention_override`` (what
  attention-patch nodes set) that counts its calls under ``tag`` and multiplies the attention's output by
  ``scale`` (1: the kernel's result unchanged); FlowCacheTestAttentionCalls (an output node) reports the count.
* FlowCacheTestBlockPatch: a clone of a MODEL with a block replacement (patches_replace "dit" double_block 0), as
  block-patch nodes set one; FlowCache does not apply it and must say so.
"""
import copy

import torch

import comfy.model_management as mm

BUDGET_KEY = "flowcache_test_weight_budget"
_model_load = mm.LoadedModel.model_load


def _model_load_with_budget(self, lowvram_model_memory=0, force_patch_weights=False):
    budget = (getattr(self.model, "model_options", None) or {}).get(BUDGET_KEY)
    if budget:
        lowvram_model_memory = budget
    return _model_load(self, lowvram_model_memory, force_patch_weights=force_patch_weights)


mm.LoadedModel.model_load = _model_load_with_budget


class FlowCacheTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31}),
                             "tokens": ("INT", {"default": 12, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 4096, "min": 1, "max": 8192})},
                "optional": {"after": ("LATENT",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, tokens, width, after=None):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g) * 0.5, {}]],)


class FlowCacheTestWeightBudget:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL,FLOWCACHE_MODEL",), "bytes": ("INT", {"default": 1, "min": 1,
                                                                                     "max": 2 ** 40})}}

    RETURN_TYPES = ("MODEL", "FLOWCACHE_MODEL")
    FUNCTION = "clone"
    CATEGORY = "testing"

    def clone(self, model, bytes):
        if hasattr(model, "patcher"):  # FlowCache Load Model's: a copy whose patcher is a clone
            out = copy.copy(model)
            out.patcher = model.patcher.clone()
            out.patcher.model_options[BUDGET_KEY] = bytes
            return (None, out)
        out = model.clone()
        out.model_options[BUDGET_KEY] = bytes
        return (out, None)


ATTENTION_CALLS: dict[str, int] = {}


class FlowCacheTestAttentionOverride:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "run"}),
                             "scale": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, tag, scale):
        ATTENTION_CALLS[tag] = 0

        def override(func, *args, **kwargs):
            ATTENTION_CALLS[tag] += 1
            out = func(*args, **kwargs)
            return out if scale == 1.0 else out * scale

        out = model.clone()
        out.model_options["transformer_options"]["optimized_attention_override"] = override
        return (out,)


class FlowCacheTestAttentionCalls:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "tag": ("STRING", {"default": "run"})}}

    RETURN_TYPES = ()
    FUNCTION = "report"
    CATEGORY = "testing"
    OUTPUT_NODE = True

    def report(self, samples, tag):
        return {"ui": {"attention_calls": [ATTENTION_CALLS.get(tag, -1)]}}


class FlowCacheTestBlockPatch:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model):
        def replace(args, extra):
            return extra["original_block"](args)

        out = model.clone()
        out.set_model_patch_replace(replace, "dit", "double_block", 0)
        return (out,)


NODE_CLASS_MAPPINGS = {"FlowCacheTestConditioning": FlowCacheTestConditioning,
                       "FlowCacheTestWeightBudget": FlowCacheTestWeightBudget,
                       "FlowCacheTestAttentionOverride": FlowCacheTestAttentionOverride,
                       "FlowCacheTestAttentionCalls": FlowCacheTestAttentionCalls,
                       "FlowCacheTestBlockPatch": FlowCacheTestBlockPatch}
