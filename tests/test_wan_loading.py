"""Loading Wan / SkyReels-DF checkpoints in every key layout and dtype, and explaining bad files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from flowcache.errors import CheckpointError
from flowcache.models import inspect_checkpoint, load_model
from tiny_models import save_wan, tiny_wan


@pytest.fixture(scope="module")
def model():
    return tiny_wan()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model.", "model."])
def test_key_prefixes(tmp_path, model, prefix):
    p = save_wan(model, tmp_path / "m.safetensors", prefix=prefix)
    lm = load_model(p, dtype="fp32")
    assert lm.family == "wan" and lm.prefix == prefix
    cfg = lm.config
    assert (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.text_dim) == (64, 96, 2, 2, 32)
    assert cfg.has_fps and cfg.patch_size == (1, 2, 2) and cfg.in_dim == 16 and cfg.out_dim == 16
    for k, v in model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v)


def test_comfy_packaged_file_with_vae_keys(tmp_path, model):
    sd = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    sd["vae.decoder.conv1.weight"] = torch.zeros(2, 2)  # other parts of an all-in-one file are ignored
    save_file(sd, str(tmp_path / "full.safetensors"), metadata={"flowcache.num_heads": "2"})
    assert load_model(tmp_path / "full.safetensors").prefix == "model.diffusion_model."


@pytest.mark.parametrize("dtype,expect", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16), (torch.float8_e4m3fn, torch.bfloat16)])
def test_dtypes(tmp_path, model, dtype, expect):
    p = save_wan(model, tmp_path / "m.safetensors", dtype=dtype)
    lm = load_model(p)  # auto keeps fp32/bf16/fp16, upcasts fp8 to bf16
    assert lm.model.dtype == expect
    ref = model.state_dict()["blocks.0.self_attn.q.weight"].to(dtype).to(expect)
    assert torch.equal(lm.model.state_dict()["blocks.0.self_attn.q.weight"], ref)
    assert load_model(p, dtype="fp32").model.dtype == torch.float32


def test_shards_with_index(tmp_path, model):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / names[0]), metadata={"flowcache.num_heads": "2"})
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / names[1]), metadata={"flowcache.num_heads": "2"})
    index = {"weight_map": {k: names[0] if i < half else names[1] for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    # the index, the folder, or any one shard (what ComfyUI's file list offers) loads the whole model
    for target in (tmp_path / "model.safetensors.index.json", tmp_path, tmp_path / names[0], tmp_path / names[1]):
        lm = load_model(target)
        assert lm.config.num_layers == 2 and lm.checkpoint.endswith("(2 shards)")


def test_self_forcing_pt_generator_dict(tmp_path, model):
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"generator": sd, "generator_ema": sd}, tmp_path / "sf.pt")
    lm = load_model(tmp_path / "sf.pt")
    assert lm.family == "wan" and lm.config.num_heads == 1  # no metadata: real Wan convention, 128-dim heads


def test_config_from_shapes_for_released_sizes():
    from flowcache.models.wan import wan_config_from_state_dict

    def fake(dim, ffn, layers, fps):
        sd = {"head.modulation": torch.empty(1, 2, dim), "patch_embedding.weight": torch.empty(dim, 16, 1, 2, 2),
              "head.head.weight": torch.empty(64, dim), "text_embedding.0.weight": torch.empty(dim, 4096),
              "time_embedding.0.weight": torch.empty(dim, 256), "blocks.0.ffn.0.weight": torch.empty(ffn, dim),
              "blocks.0.self_attn.norm_q.weight": torch.empty(dim), "blocks.0.norm3.weight": torch.empty(dim)}
        sd.update({f"blocks.{i}.modulation": torch.empty(1, 6, dim) for i in range(layers)})
        if fps:
            sd["fps_embedding.weight"] = torch.empty(2, dim)
        return sd
    c13 = wan_config_from_state_dict(fake(1536, 8960, 30, True))
    assert (c13.num_heads, c13.num_layers, c13.has_fps, c13.size_name) == (12, 30, True, "1.3B")
    c14 = wan_config_from_state_dict(fake(5120, 13824, 40, False))
    assert (c14.num_heads, c14.num_layers, c14.has_fps, c14.size_name) == (40, 40, False, "14B")


def test_bad_files_are_explained(tmp_path, model):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(junk)
    notst = tmp_path / "notes.safetensors"
    notst.write_bytes(b"hello world, this is not a model at all" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(notst)
    good = save_wan(model, tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut)
    with pytest.raises(CheckpointError, match="unsupported file type"):
        (tmp_path / "m.ckpt2").write_bytes(b"x")
        load_model(tmp_path / "m.ckpt2")


def test_missing_and_unexpected_keys(tmp_path, model):
    sd = dict(model.state_dict())
    sd.pop("blocks.1.ffn.2.bias")
    save_file(sd, str(tmp_path / "miss.safetensors"), metadata={"flowcache.num_heads": "2"})
    with pytest.raises(CheckpointError, match="missing.*blocks.1.ffn.2.bias"):
        load_model(tmp_path / "miss.safetensors")
    sd = dict(model.state_dict())
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "extra.safetensors"), metadata={"flowcache.num_heads": "2"})
    with pytest.raises(CheckpointError, match="unexpected.*blocks.0.extra.weight"):
        load_model(tmp_path / "extra.safetensors")


def test_not_a_video_model_and_wrong_family(tmp_path):
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a supported video model"):
        load_model(tmp_path / "vae.safetensors")
    magi_like = {"x_embedder.weight": torch.zeros(8, 16, 1, 2, 2), "videodit_blocks.layers.0.x.weight": torch.zeros(2)}
    save_file(magi_like, str(tmp_path / "magi.safetensors"))
    with pytest.raises(CheckpointError, match="MAGI-1 DiT checkpoint, but this loader expects a Wan"):
        load_model(tmp_path / "magi.safetensors", expect="wan")


def test_inspect(tmp_path, model):
    info = inspect_checkpoint(save_wan(model, tmp_path / "m.safetensors", prefix="model.diffusion_model.",
                                       dtype=torch.bfloat16))
    assert info["family"].startswith("Wan") and info["key_prefix"] == "model.diffusion_model."
    assert info["dtypes"] == {"bf16": len(model.state_dict())} and info["config"]["dim"] == 64
