"""Preset values read ahead from a checkpoint's headers: the same as the loader resolves after loading."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file

from comfy_helpers import TINY_PRESETS, demo_available, pack_submodule, write_tiny_wan
from flowcache.errors import CheckpointError, InputError
from flowcache.models import header_facts, load_model
from flowcache.presets import preset_rows, resolve_cache, write_preset_file
from tiny_models import tiny_wan


def rows_of(path):
    facts = header_facts(path)
    return preset_rows(facts.preset_key, facts.extra_presets)


def test_rows_match_what_the_loaded_model_resolves(tmp_path):
    path = tmp_path / "my_finetune.safetensors"
    model = tiny_wan(seed=0)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"flowcache.num_heads": "2"})  # ComfyUI-packaged key prefix
    info = rows_of(path)
    assert info == {"key": "wan-dim64", "known": False, "rows": {}, "hint": info["hint"]} and "calibrate" in info["hint"]

    entry = {"coefficients": [2.0, 0.0],
             "flowcache": {"slow": {"threshold": 0.07, "warmup": 3, "kv_budget": 1},
                           "fast": {"threshold": 0.11, "warmup": 2, "kv_budget": 0}},
             "teacache": {"slow": {"threshold": 0.09, "warmup": 4, "kv_budget": 0},
                          "fast": {"threshold": 0.3, "warmup": 4, "kv_budget": 0}}}
    write_preset_file(tmp_path / "my_finetune.presets.json", {"wan-dim64": entry})  # calibrate's default output
    info = rows_of(path)
    lm = load_model(path)
    assert info["known"] and info["key"] == lm.preset_key == "wan-dim64"
    for method in ("flowcache", "teacache"):
        for preset in ("slow", "fast"):
            s = resolve_cache(lm.preset_key, method, preset, lm.extra_presets)
            assert info["rows"][method][preset] == {"threshold": s.config.threshold, "warmup": s.config.warmup,
                                                    "kv_budget": s.kv_budget, "mix_lambda": s.mix_lambda,
                                                    "attention": s.attention, "reuse": s.reuse}
    assert info["rows"]["flowcache"]["slow"]["threshold"] == 0.07


def test_embedded_presets_and_errors(tmp_path, pack):
    path = write_tiny_wan(tmp_path / "tiny.safetensors", pack)
    facts = header_facts(path)
    assert facts.preset_key == "tiny-test" and facts.extra_presets == TINY_PRESETS and facts.family == "wan"
    assert rows_of(path)["rows"]["flowcache"]["fast"]["kv_budget"] == 1
    other = tmp_path / "vae.safetensors"
    save_file({"encoder.conv.weight": __import__("torch").zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="vae.safetensors: not a supported video model"):
        header_facts(other)


def test_node_side_answer(pack, comfy):
    route = pack_submodule(pack, "nodes.presets_route")
    write_tiny_wan(comfy.models_dir / "sub" / "tiny.safetensors", pack)
    got = route.model_presets("sub/tiny.safetensors")
    assert got["known"] and got["key"] == "tiny-test" and got["model_name"] == "sub/tiny.safetensors"
    assert got["rows"]["teacache"]["fast"]["threshold"] == 0.2
    missing = route.model_presets("nope.safetensors")
    assert missing["known"] is False and "nope.safetensors was not found in models/diffusion_models" in missing["error"]
    assert route.register_routes() is False  # the stub server has no route table: nothing registered
    if demo_available(pack):
        demo = route.model_presets(pack_submodule(pack, "nodes.demo").DEMO_ENTRY)
        assert demo["key"] == "demo" and demo["rows"]["flowcache"]["fast"]["threshold"] == 0.25



def test_route_without_model_name_says_the_parameter_is_required(pack, comfy):
    """GET /flowcache/model_presets with no model_name (or an empty one): status 400 and an error that names the
    query parameter and what it holds, not "model_name:  was not found"."""
    route = pack_submodule(pack, "nodes.presets_route")
    for query in ({}, {"model_name": ""}, {"model_name": " ", "loop": "causal"}):
        status, body = route.answer(query)
        assert status == 400 and body["known"] is False and body["rows"] == {}, query
        err = body["error"]
        assert err.startswith("the query parameter model_name is required") and "models/diffusion_models" in err
        assert "was not found" not in err
    assert route.model_presets("")["error"] == body["error"]  # the function behind it says the same
    write_tiny_wan(comfy.models_dir / "tiny.safetensors", pack)
    status, body = route.answer({"model_name": "tiny.safetensors", "loop": "auto"})
    assert status == 200 and body["known"] and body["key"] == "tiny-test"
    assert "model_name" in route.__doc__ and "required" in route.__doc__

def test_the_loaders_loop_choice_picks_the_causal_rows(tmp_path, pack, comfy):
    """A Wan file with nothing marking it causal answers with the diffusion-forcing row; with the loader's
    loop = causal (the frontend sends it), with the causal row, as the sampler will use at run time."""
    import torch

    from tiny_models import save_wan, tiny_wan

    route = pack_submodule(pack, "nodes.presets_route")
    model = tiny_wan(seed=2, has_fps=False)
    save_wan(model, comfy.models_dir / "plain_wan.safetensors")
    auto = route.model_presets("plain_wan.safetensors")
    causal = route.model_presets("plain_wan.safetensors", "causal")
    assert auto["key"] + "-causal" == causal["key"], (auto, causal)
    assert route.model_presets("plain_wan.safetensors", "diffusion_forcing")["key"] == auto["key"]
    bad = route.model_presets("plain_wan.safetensors", "sideways")
    assert bad["known"] is False and "loop='sideways'" in bad["error"]


def test_attention_from_the_entry_and_from_a_preset_row():
    """The model's entry names its chunk attention; a preset row may name its own, which wins (custom starts from
    the slow row); without either, block_causal (the FlowCache code's arithmetic)."""
    from flowcache.presets import resolve_cache

    row = {"threshold": 0.1, "warmup": 2}
    table = {"m": {"coefficients": [1.0, 0.0], "attention": "window",
                   "flowcache": {"slow": {**row, "attention": "window_refresh"}, "fast": row}},
             "n": {"coefficients": [1.0, 0.0], "flowcache": {"slow": row, "fast": row}}}
    assert resolve_cache("m", "flowcache", "slow", table).attention == "window_refresh"
    assert resolve_cache("m", "flowcache", "fast", table).attention == "window"
    # custom starts from the slow row, its attention included
    assert resolve_cache("m", "flowcache", "custom", table, threshold=0.3).attention == "window_refresh"
    assert resolve_cache("n", "flowcache", "fast", table).attention == "block_causal"
    # a table file holding them passes the checks; a misspelt attention is refused, naming the field
    from flowcache.errors import CheckpointError
    from flowcache.presets import check_table
    assert check_table(table, "t.json") == table
    bad = {"m": {**table["m"], "flowcache": {"slow": {**row, "attention": "windowed"}}}}
    with pytest.raises(CheckpointError, match=r"flowcache\.slow\.attention"):
        check_table(bad, "t.json")


def test_turbo_rows_are_read_where_a_model_has_them_and_refused_where_not():
    """turbo is a named preset: ``preset_rows`` (what the node's lock shows) lists a method's turbo row when the
    model has one and leaves it out otherwise; asking a released model (none has one) for it names the model,
    the presets it has, and that turbo needs calibration."""
    row = {"threshold": 0.07, "warmup": 3, "kv_budget": 0}
    table = {"m": {"coefficients": [1.0, 0.0],
                   "flowcache": {"slow": row, "fast": row, "turbo": {**row, "threshold": 0.5, "reuse": "hold"}},
                   "teacache": {"slow": row, "fast": row}}}
    rows = preset_rows("m", table)["rows"]
    assert rows["flowcache"]["turbo"]["threshold"] == 0.5 and rows["flowcache"]["turbo"]["reuse"] == "hold"
    assert set(rows["teacache"]) == {"slow", "fast"}
    assert resolve_cache("m", "flowcache", "turbo", table).config.threshold == 0.5
    for key in ("wan-1.3B", "wan-14B", "magi-4.5B", "wan-1.3B-causal"):
        assert "turbo" not in preset_rows(key)["rows"]["flowcache"]
        for method in ("flowcache", "teacache", "magcache", "easycache"):
            with pytest.raises(InputError) as e:
                resolve_cache(key, method, "turbo")
            assert str(e.value).startswith(f"preset='turbo': model {key!r} has no {method} turbo preset; its "
                                           f"{method} presets are slow, fast; turbo needs calibration"), str(e.value)
