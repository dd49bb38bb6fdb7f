"""CFG-aware reuse: with classifier-free guidance, a unit's unconditional branch reused on more steps than its
conditional one.

The unconditional prediction changes more slowly along the trajectory than the conditional one and weighs less
in the guided result (FasterCache, arXiv 2410.19355). With ``CacheSettings.cfg_reuse`` on, the conditional
branch decides as the method's rule says (from the unit's signal) and the unconditional branch follows it: it
computes only on steps where the conditional branch computes, and then only on every ``interval``-th of them
(and on forced steps, and whenever it has nothing cached). On its other steps it is reused:

* ``own``: its own cached payload, as the method's ``reuse`` applies it (held or forecast);
* ``delta``: the conditional branch's current output plus the cached difference (uncond − cond) of the last
  step both computed. The payload kept for the unconditional branch is that difference (one slot per unit, as
  its own residual would take), so the memory plan is the same.

The runner applies ``gate`` to each step's decisions and ``payloads`` to each step's kept payloads; a Wan step
asks ``base_branch`` which output a reused branch adds its payload to. A run with one decision branch (no CFG,
MAGI-1's in-chunk guidance) is untouched, as is every run with ``mode = "off"``.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

CFG_REUSE = ("off", "own", "delta")
COND, UNCOND = "cond", "uncond"


class CfgReuse:
    """The rule and its per-unit state: how many of the conditional branch's computes the unconditional branch
    has sat out since it last computed. mode: one of ``CFG_REUSE``; interval: the unconditional branch computes
    on every interval-th conditional compute (1: on each, only the conditional branch's reuses are followed)."""

    def __init__(self, mode: str = "off", interval: int = 2):
        self.mode, self.interval = mode, interval
        self.since: dict[Hashable, int] = {}

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def reset(self) -> None:
        """Drop all state: a new run or long-video window (the policy's ``reset``)."""
        self.since.clear()

    def forget(self, unit: Hashable) -> None:
        self.since.pop(unit, None)

    def applies(self, branches: tuple[str, ...]) -> bool:
        """Whether a run with these decision branches is gated: on, with both CFG branches."""
        return self.active and COND in branches and UNCOND in branches

    def gate(self, unit: Hashable, force: bool, decisions: dict, can_reuse: Callable[[tuple], bool]) -> None:
        """Rewrite the unconditional branch's decision of ``unit`` in ``decisions`` (per (branch, unit)) from the
        conditional one's, in place."""
        cond, uncond = (COND, unit), (UNCOND, unit)
        sat_out = self.since.get(unit, 0)
        if not can_reuse(uncond):  # nothing cached: it computes (and, for a delta, with the cond branch)
            compute = True
            if self.mode == "delta":
                decisions[cond] = True
        elif decisions[cond]:
            compute = force or sat_out + 1 >= self.interval
        else:
            compute = False
        decisions[uncond] = compute
        if compute:
            self.since[unit] = 0
        elif decisions[cond]:
            self.since[unit] = sat_out + 1

    def base_branch(self, branch: str) -> str | None:
        """The branch whose current output a reused ``branch`` adds its payload to (None: its own input)."""
        return COND if self.mode == "delta" and branch == UNCOND else None

    def payloads(self, payloads: list[tuple[tuple[str, Hashable], torch.Tensor]]
                 ) -> list[tuple[tuple[str, Hashable], torch.Tensor]]:
        """A step's kept payloads as the policy keeps them: for ``delta``, each unconditional residual becomes
        its difference to the conditional residual of the same unit and step (both outputs are the same input
        plus their residual, so this is uncond − cond of the outputs)."""
        if self.mode != "delta":
            return payloads
        cond = {key[1]: p for key, p in payloads if key[0] == COND}
        out = []
        for key, p in payloads:
            if key[0] == UNCOND:
                if key[1] not in cond:  # the gate computes the uncond branch only with the cond one
                    raise RuntimeError(f"cfg_reuse=delta: {key!r} computed without its conditional branch")
                p = p - cond[key[1]]
            out.append((key, p))
        return out


__all__ = ["CFG_REUSE", "CfgReuse"]
