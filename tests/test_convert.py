"""``python -m flowcache convert``: LongLive's release files as safetensors for ComfyUI's own loaders.

The real-server check (the converted LoRA through ComfyUI's LoraLoaderModelOnly on the converted base gives the
latents of FlowCache Load Model's merge) is in test_comfy_causal.py; here the files themselves: ComfyUI's LoRA
arithmetic on the converted keys equals the pack's merge, the base keeps its weights and says LongLive, and what
must be refused is, in one line, writing nothing.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowcache.cli import main
from flowcache.models import load_model
from flowcache.models.lora import merge_lora, read_lora
from tiny_models import HOSTILE_FORMATS, tiny_wan, write_hostile

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
           "cross_attn.o", "ffn.0", "ffn.2")


def release_files(tmp_path, rank: int = 4):
    """A tiny Wan in LongLive's base layout ({'generator': 'model.' keys}) and a LoRA in its lora.pt layout
    ({'generator_lora': peft keys}, no alpha: scale 1) on every Linear of the attention blocks."""
    sd = {k: v.detach().clone() for k, v in tiny_wan(seed=3, has_fps=False).state_dict().items()}
    base = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, base)
    g = torch.Generator().manual_seed(5)
    lora = {}
    for b in range(2):
        for t in TARGETS:
            w = sd[f"blocks.{b}.{t}.weight"]
            lora[f"base_model.model.blocks.{b}.{t}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.1
            lora[f"base_model.model.blocks.{b}.{t}.lora_B.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.1
    lora_path = tmp_path / "lora.pt"
    torch.save({"generator_lora": lora}, lora_path)
    return sd, base, lora_path


def comfy_apply(sd: dict, lora: dict, strength: float = 1.0) -> dict:
    """ComfyUI's LoRA arithmetic (comfy/weight_adapter/lora.py, calculate_weight) on its own key layout: each
    ``diffusion_model.<module>`` maps to ``<module>.weight`` (model_lora_keys_unet's generic format)."""
    out = dict(sd)
    for k in lora:
        if not k.endswith(".lora_up.weight"):
            continue
        module = k[len("diffusion_model."):-len(".lora_up.weight")]
        up, down = lora[k].float(), lora[k.replace("lora_up", "lora_down")].float()
        alpha = float(lora[k.replace(".lora_up.weight", ".alpha")]) / down.shape[0]
        w = sd[module + ".weight"]
        out[module + ".weight"] = w + ((strength * alpha) * torch.mm(up.flatten(1), down.flatten(1))).to(w.dtype)
    return out


def test_converted_lora_applied_as_comfyui_does_equals_the_merge(tmp_path):
    sd, _, lora_path = release_files(tmp_path)
    out = tmp_path / "longlive_lora.safetensors"
    assert main(["convert", "longlive-lora", str(lora_path), str(out)]) == 0
    converted = load_file(str(out))
    assert len(converted) == 3 * 2 * len(TARGETS)
    assert all(k.startswith("diffusion_model.blocks.") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
               for k in converted)
    # every key names a weight of the model (nothing ComfyUI would log as "lora key not loaded")
    assert {k[len("diffusion_model."):].rsplit(".lora_", 1)[0].removesuffix(".alpha") + ".weight"
            for k in converted} <= set(sd)
    assert float(converted["diffusion_model.blocks.0.self_attn.q.alpha"]) == 4.0  # alpha = rank: scale 1
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"flowcache.converted_from": "lora.pt", "flowcache.lora_layout": "generator_lora"}
    ours = dict(sd)
    assert merge_lora(ours, read_lora(lora_path), "base") == 2 * len(TARGETS)
    theirs = comfy_apply(sd, converted)
    for k in sd:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(ours[k], sd[k]) for k in sd)
    # and the converted file reads back as the same LoRA
    again = read_lora(out)
    assert set(again.pairs) == set(read_lora(lora_path).pairs) and {s for *_, s in again.pairs.values()} == {1.0}


def test_converted_base_loads_as_longlive_whatever_its_name(tmp_path):
    sd, base, lora_path = release_files(tmp_path)
    out = tmp_path / "renamed_model.safetensors"
    assert main(["convert", "longlive-base", str(base), str(out), "--dtype", "bf16"]) == 0
    converted = load_file(str(out))
    assert set(converted) == set(sd) and all(v.dtype == torch.bfloat16 for v in converted.values())
    assert torch.equal(converted["blocks.0.self_attn.q.weight"], sd["blocks.0.self_attn.q.weight"].bfloat16())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["flowcache.loop"] == "longlive"
    lm = load_model(out, "fp32", lora=lora_path)
    assert lm.loop == "longlive" and "metadata flowcache.loop" in lm.notes[0], lm.notes
    assert lm.preset_key == "wan-1.3B-causal" or lm.preset_key.endswith("-causal")


@pytest.mark.parametrize("how", HOSTILE_FORMATS)
@pytest.mark.parametrize("kind", ["longlive-lora", "longlive-base"])
def test_a_payload_pt_is_refused_in_one_line(tmp_path, capsys, how, kind):
    marker = tmp_path / "pwned"
    src = write_hostile(tmp_path / "lora.pt", marker, how, {"base_model.model.blocks.0.ffn.0.lora_A.weight":
                                                           torch.zeros(2, 2)} if how != "pickle4" else None)
    out = tmp_path / "out.safetensors"
    assert main(["convert", kind, str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: lora.pt: not loadable as a weights-only torch file"), err
    assert not marker.exists() and not out.exists() and list(tmp_path.iterdir()) == [src]


def test_refusals_write_nothing(tmp_path, capsys, monkeypatch):
    sd, base, lora_path = release_files(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", "longlive-lora", str(lora_path), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["convert", "longlive-lora", str(lora_path), str(tmp_path / "out.pt")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert main(["convert", "longlive-lora", str(lora_path), str(tmp_path / "no_dir" / "x.safetensors")]) == 2
    assert "no such folder" in capsys.readouterr().err
    # a LoRA for another model: a module that is not a Wan2.1 Linear
    other = tmp_path / "other.pt"
    torch.save({"up_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 4),
                "up_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 2)}, other)
    assert main(["convert", "longlive-lora", str(other), str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "'up_blocks.0.attn.to_q' is not a Linear layer of the Wan2.1 diffusion model" in err and err.count("\n") == 1
    # the LoRA is not a base model, the base is not a LoRA
    assert main(["convert", "longlive-base", str(lora_path), str(tmp_path / "b.safetensors")]) == 2
    assert "lora.pt: not a model checkpoint" in capsys.readouterr().err
    assert main(["convert", "longlive-lora", str(base), str(tmp_path / "l.safetensors")]) == 2
    assert "not a LoRA" in capsys.readouterr().err
    # a failure while writing leaves neither the output nor a temporary file
    import safetensors.torch

    def broken(*args, **kwargs):
        open(args[1], "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    assert main(["convert", "longlive-base", str(base), str(tmp_path / "full.safetensors"), "--force"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["longlive_base.pt", "lora.pt", "other.pt", "out.safetensors"]
