"""FlowCache Prompt Schedule: several prompts, each from the video frame where it starts, for FlowCache Sampler's
``positive`` input. Each loop changes prompt by its model's own rule (see ``flowcache.prompts``)."""
from __future__ import annotations

from typing import Any

from ..flowcache.errors import InputError
from ..flowcache.prompts import TRANSITIONS, PromptEntry, PromptSchedule
from .comfy_v3 import FLOWCACHE_PROMPTS, check_choices, io

MAX_ENTRIES = 6  # prompts one node takes


def _conditioning_states(cond: Any, name: str):
    """The text states of a CONDITIONING (``cond[0][0]``) and its extras (MAGI-1's mask and special tokens)."""
    try:
        states, extra = cond[0][0], cond[0][1]
    except (TypeError, IndexError, KeyError):
        states, extra = None, None
    import torch
    if not isinstance(states, torch.Tensor):
        raise InputError(f"{name}: expected CONDITIONING from a text encoder node (CLIP Text Encode), got "
                         f"{type(cond).__name__}.")
    return states, extra if isinstance(extra, dict) else {}


def _later_prompts() -> list:
    """conditioning_i and start_frame_i for i = 2..MAX_ENTRIES, pairwise (optional: fewer prompts are fine)."""
    inputs = []
    for i in range(2, MAX_ENTRIES + 1):
        inputs.append(io.Conditioning.Input(
            f"conditioning_{i}", optional=True,
            tooltip=f"Prompt {i} (CLIP Text Encode), from start_frame_{i} on. Leave unconnected to use fewer "
                    "prompts."))
        inputs.append(io.Int.Input(
            f"start_frame_{i}", optional=True, default=40 * (i - 1), min=1, max=100000, step=1,
            tooltip=f"The video frame where prompt {i} starts (frames count as num_frames does; each must come "
                    "after the previous prompt's). A causal model changes at its next block, diffusion forcing at "
                    "its next window, MAGI-1 at its next chunk."))
    return inputs


class FlowCachePromptSchedule(io.ComfyNode):
    """Prompts that change over the video: conditioning_1 from frame 0, each further one from its start frame."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowCachePromptSchedule", display_name="FlowCache Prompt Schedule", category="FlowCache",
            description="Several prompts, each starting at a frame of the video, for FlowCache Sampler's positive "
                        "input. Changes take effect at block (causal), window (diffusion forcing) or chunk (MAGI-1) "
                        "boundaries and are marked on the sampler's map.",
            inputs=[
                io.Conditioning.Input("conditioning_1", tooltip="The first prompt (CLIP Text Encode), from frame 0."),
                # how a causal model changes prompt
                io.Combo.Input(
                    "transition", options=list(TRANSITIONS), default="auto",
                    tooltip="How a causal model changes prompt. auto: its own rule (LongLive re-caches its window "
                            "with the new prompt, Krea Realtime blends over blend_blocks, Self-Forcing/CausVid "
                            "switch); switch: later blocks read the new prompt; recache: the window's K/V are "
                            "recomputed with it first (LongLive's rule, an option for Self-Forcing/CausVid); blend: "
                            "Krea's. Diffusion forcing and MAGI-1 switch per window / chunk whatever this says."),
                io.Int.Input(
                    "blend_blocks", default=4, min=1, max=64, step=1,
                    tooltip="Krea Realtime: blocks a change is blended over (the release: 4; its first block still "
                            "shows the old prompt). 1 switches at once."),
                io.Boolean.Input(
                    "keep_sink", default=True,
                    tooltip="recache: keep the attention sink's keys/values of the first prompt (LongLive's "
                            "global_sink, its release setting); off: the sink is re-cached too."),
                *_later_prompts(),
            ],
            outputs=[FLOWCACHE_PROMPTS.Output(display_name="prompts",
                                              tooltip="The prompts over time, for FlowCache Sampler's positive "
                                                      "input.")])

    @classmethod
    def validate_inputs(cls, transition: str = "auto") -> bool | str:
        return check_choices(cls, transition=transition)

    @classmethod
    def execute(cls, conditioning_1: Any, transition: str = "auto", blend_blocks: int = 4, keep_sink: bool = True,
                **entries: Any) -> io.NodeOutput:
        if transition not in TRANSITIONS:
            raise InputError(f"transition={transition!r}: must be one of {', '.join(TRANSITIONS)}.")
        states, extra = _conditioning_states(conditioning_1, "conditioning_1")
        schedule = [PromptEntry(0, states)]
        extras = [extra]
        for i in range(2, MAX_ENTRIES + 1):
            cond = entries.get(f"conditioning_{i}")
            if cond is None:
                continue
            start = entries.get(f"start_frame_{i}", 40 * (i - 1))
            if not isinstance(start, int) or isinstance(start, bool) or start < 1:
                raise InputError(f"start_frame_{i}={start!r}: must be a frame number ≥ 1 (prompt 1 starts at 0).")
            states, extra = _conditioning_states(cond, f"conditioning_{i}")
            schedule.append(PromptEntry(start, states))
            extras.append(extra)
        for n, (a, b) in enumerate(zip(schedule, schedule[1:]), start=2):
            if b.start_frame <= a.start_frame:
                raise InputError(f"prompts: entry {n} starts at frame {b.start_frame}, not after entry {n - 1} "
                                 f"(frame {a.start_frame}); start frames must increase.")
        return io.NodeOutput(PromptSchedule(schedule, transition, int(blend_blocks), bool(keep_sink), extras))
