"""Prompts that change over time: a schedule of text states, each from the video frame where it starts.

A loop asks the schedule which entry holds at a latent frame and applies the change by its model's own rule
(``TRANSITIONS``): a causal loop at its block boundaries (LongLive re-caches its window with the new text,
Krea Realtime blends the text over a few blocks, Self-Forcing / CausVid switch plainly), diffusion forcing per
window, MAGI-1 per chunk. Frames are the video's (pixel) frames, as the sampler's num_frames counts them; a
model with a temporal stride s puts pixel frame p in latent frame ⌈p / s⌉ (frame 0 is latent 0, frames
1..s latent 1, ...), so a change takes effect from the first unit (block, window, chunk) that starts at or
after that latent frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError
from .validate import one_of

# How a causal loop applies a change of prompt. "auto" takes the model's own rule.
TRANSITIONS = ("auto", "switch", "recache", "blend")


@dataclass(frozen=True)
class PromptEntry:
    """One prompt: its text states [1, S, text_dim] and the video frame where it starts."""

    start_frame: int
    states: torch.Tensor


@dataclass
class PromptSchedule:
    """Prompts over time, in order of their start frames (the first starts at frame 0).

    transition: how a causal loop changes prompt (see ``TRANSITIONS``); blend_blocks: Krea Realtime's blend
    length in blocks (the release's 4); keep_sink: a re-cache keeps the attention sink's K/V of the old prompt
    (LongLive's ``global_sink``)."""

    entries: list[PromptEntry]
    transition: str = "auto"
    blend_blocks: int = 4
    keep_sink: bool = True
    extras: list[dict] = field(default_factory=list)  # per entry, the CONDITIONING's extras (MAGI-1's mask, tokens)
    latent_starts: list[int] = field(default_factory=list)  # filled by ``check``

    @classmethod
    def single(cls, states: torch.Tensor) -> "PromptSchedule":
        return cls([PromptEntry(0, states)])

    def check(self, num_frames: int, temporal_stride: int) -> "PromptSchedule":
        """Validate against a video of ``num_frames`` frames (errors name the entry) and compute each entry's
        latent start frame. Returns self."""
        if not self.entries:
            raise InputError("prompts: the schedule holds no prompt; connect at least one CONDITIONING.")
        one_of(self.transition, "transition", TRANSITIONS)
        if not isinstance(self.blend_blocks, int) or self.blend_blocks < 1:
            raise InputError(f"blend_blocks={self.blend_blocks!r}: must be a whole number of blocks ≥ 1.")
        first = self.entries[0].start_frame
        if first != 0:
            raise InputError(f"prompts: entry 1 starts at frame {first}; the first prompt starts the video "
                             "(frame 0).")
        for i, (a, b) in enumerate(zip(self.entries, self.entries[1:]), start=2):
            if b.start_frame <= a.start_frame:
                raise InputError(f"prompts: entry {i} starts at frame {b.start_frame}, not after entry {i - 1} "
                                 f"(frame {a.start_frame}); start frames must increase.")
        last = num_frames - 1
        for i, e in enumerate(self.entries, start=1):
            if e.start_frame > last:
                raise InputError(f"prompts: entry {i} starts at frame {e.start_frame}, past the video's end "
                                 f"(num_frames={num_frames}: the last frame is {last}).")
        self.latent_starts = [latent_frame(e.start_frame, temporal_stride) for e in self.entries]
        return self

    def entry_at(self, latent: int) -> int:
        """The index of the entry that holds at latent frame ``latent`` (after ``check``)."""
        idx = 0
        for i, start in enumerate(self.latent_starts):
            if start <= latent:
                idx = i
        return idx

    def rule(self, model_rule: str) -> str:
        """The transition to use: the schedule's, or the model's own for ``auto``."""
        return model_rule if self.transition == "auto" else self.transition


def latent_frame(pixel_frame: int, temporal_stride: int) -> int:
    """The latent frame that holds video frame ``pixel_frame`` (Wan's causal VAE: frame 0 alone, then groups
    of ``temporal_stride``)."""
    return -(-int(pixel_frame) // temporal_stride)


def as_schedule(prompts: "PromptSchedule | torch.Tensor") -> PromptSchedule:
    """One prompt or a schedule, as a schedule."""
    return prompts if isinstance(prompts, PromptSchedule) else PromptSchedule.single(prompts)


def switch_record(unit: int, latent: int, entry: int, rule: str, temporal_stride: int) -> dict:
    """A prompt change as the run's statistics record it (and the node's map draws it): the unit (block, window
    or chunk) where it takes effect, its first latent and video frame, the entry (1-based) and the rule."""
    return {"chunk": unit, "latent_frame": latent, "frame": max(0, (latent - 1) * temporal_stride + 1) if latent else 0,
            "entry": entry + 1, "rule": rule}


__all__ = ["PromptEntry", "PromptSchedule", "TRANSITIONS", "as_schedule", "latent_frame", "switch_record"]
