"""One step of a Wan2.1 DiT over some units, for every text branch: the model call that the diffusion-forcing
and causal Wan loops share.

The units' latents and timesteps do not depend on the text, so they are embedded once for all branches.
Each branch decides per unit; branches that computed the same units (always, when they see the same e0)
run as one batch, and all computed units of a step run as one forward: on the chunk path chunks are laid end
to end along the tokens and attend chunk by chunk against each branch's KV store (``StepAttention``), on the
window path the window runs plain attention under an optional mask. A reused unit takes its cached backbone
residual ``h − h0`` (``reuse``); the head always runs with the current timestep. ``predict`` returns the
predictions and the ``Work`` done (each computed unit's new residual, the forwards and their FLOPs): the
runner keeps and counts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..cache.base import UnitSignal
from ..errors import InputError
from ..flops import forward_flops, text_projection_flops
from ..kv.store import KVStore, StepAttention
from ..models.wan import WanForward
from ..runner import Decisions, Reuse, Unit, Work


@dataclass
class UnitSpan:
    """Where a unit's latents are: ``frames`` of the segment's latent, first RoPE frame ``frame_offset``."""

    frames: slice
    frame_offset: int


@dataclass
class WholeWindow:
    """The window path's forward: the whole window in one plain attention under ``mask`` (None: full
    attention); ``flops`` per branch: (FLOPs, paper FLOPs) of that forward."""

    mask: torch.Tensor | None
    flops: dict[str, tuple[float, float]]


@dataclass
class Embedded:
    """A step's units embedded once: e [1, F, D], e0 [1, F, 6, D] per unit frame, h0 [1, L, D] tokens,
    idx the segment frames they came from, spans per unit (frames, tokens) of the concatenation."""

    e: torch.Tensor
    e0: torch.Tensor
    h0: torch.Tensor
    idx: torch.Tensor
    spans: list[tuple[slice, slice]]
    grid_hw: tuple[int, int]


def check_conditioning(ctx: torch.Tensor, text_dim: int, text_len: int, name: str) -> torch.Tensor:
    """[1, S, text_dim] text states, zero-padded to ``text_len`` rows."""
    if ctx.dim() == 2:
        ctx = ctx[None]
    if ctx.dim() != 3 or ctx.shape[0] != 1:
        raise InputError(f"{name}: conditioning must be [1, tokens, {text_dim}], got {list(ctx.shape)}.")
    if ctx.shape[2] != text_dim:
        raise InputError(f"{name}: conditioning width is {ctx.shape[2]} but the model takes {text_dim} "
                         f"(Wan needs umT5-XXL states: CLIPLoader type 'wan').")
    if ctx.shape[1] == 0 or ctx.shape[1] > text_len:
        raise InputError(f"{name}: conditioning has {ctx.shape[1]} tokens; this model takes 1..{text_len}. "
                         "Shorten the prompt.")
    if ctx.shape[1] < text_len:
        ctx = torch.cat([ctx, ctx.new_zeros(1, text_len - ctx.shape[1], text_dim)], dim=1)
    return ctx


class WanStep:
    """The Wan model call of one step. contexts: embedded text per branch, in the run's branch order."""

    def __init__(self, model: WanForward, contexts: dict[str, torch.Tensor], fps: float | None,
                 causal: bool = True, text_kv_once: bool = False, slice_tokens: int = 0,
                 cancel: Callable[[], None] | None = None):
        """causal: on the chunk path a chunk attends to the stored rows up to its own slot (else to every stored
        row, its later chunks' too). text_kv_once: compute the cross-attention keys/values of the text once per
        run and reuse them (the causal Wan models' official loop does; SkyReels' recomputes them every forward).
        slice_tokens: the lean forward (``WanForward.run_blocks``), 0 for the batched one. cancel: the host's
        cancel check, called between blocks."""
        self.model, self.contexts, self.fps, self.cancel = model, contexts, fps, cancel
        self.branches = list(contexts)
        self.causal = causal
        self.text_kv: dict[tuple[int, ...], dict] | None = {} if text_kv_once else None
        self.slice_tokens = slice_tokens
        self._rope: tuple | None = None  # the last RoPE tables and their key: consecutive steps share them

    def set_contexts(self, contexts: dict[str, torch.Tensor]) -> None:
        """New embedded text per branch (a prompt change); the text's keys/values are computed again."""
        if list(contexts) != self.branches:
            raise ValueError(f"branches {list(contexts)} differ from the run's {self.branches}")
        self.contexts = contexts
        if self.text_kv is not None:
            self.text_kv = {}

    def rope(self, grid: tuple[int, int, int], offsets: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of a forward, kept for the next step (one entry: a run's memory stays bounded)."""
        key = (grid, offsets)
        if self._rope is None or self._rope[0] != key:
            self._rope = (key, self.model.rope(grid, offsets))
        return self._rope[1]

    def embed(self, x_in: torch.Tensor, t_frames: torch.Tensor, pos: torch.Tensor | None,
              spans: list[UnitSpan]) -> Embedded:
        """x_in [1, C, F, h, w] and per-frame timesteps t_frames [1, F] of the segment -> the units' embedding."""
        model, pt = self.model, self.model.cfg.patch_size[0]
        grid_hw = (x_in.shape[3] // model.cfg.patch_size[1], x_in.shape[4] // model.cfg.patch_size[2])
        tok_frame = grid_hw[0] * grid_hw[1]
        idx = torch.cat([torch.arange(s.frames.start, s.frames.stop) for s in spans]).to(x_in.device)
        e, e0 = model.time_embed(t_frames.index_select(1, idx), self.fps)
        # contiguous once here, not copied again by every op of the first block that reads it
        h0 = model.embed(x_in.index_select(2, idx), None if pos is None else pos.index_select(2, idx)).contiguous()
        out, f0 = [], 0
        for s in spans:
            nf = s.frames.stop - s.frames.start
            out.append((slice(f0, f0 + nf), slice(f0 // pt * tok_frame, (f0 + nf) // pt * tok_frame)))
            f0 += nf
        return Embedded(e, e0, h0, idx, out, grid_hw)

    def signals(self, emb: Embedded, units: list[Unit]) -> dict[object, UnitSignal]:
        """Each unit's e0 slice (the FlowCache / TeaCache signal) and its embedded tokens (its input)."""
        return {u.id: UnitSignal(emb.e0[:, fr], emb.h0[:, tok]) for u, (fr, tok) in zip(units, emb.spans)}

    def predict(self, emb: Embedded, units: list[Unit], spans: list[UnitSpan], decisions: Decisions,
                reuse: Reuse, store: KVStore | None = None, whole: WholeWindow | None = None, kv=None
                ) -> tuple[dict[str, torch.Tensor], Work]:
        """Every branch's prediction for the frames of the units with ``output`` [1, C, F_out, h, w] (fp32;
        ``output_frames`` says which segment frames they are), and the work done.

        reuse: a reused unit's residual per (branch, unit). store: the chunk path's KV store (attention through
        it); whole: the window path's forward instead. kv: on the chunk path, the attention to use instead of
        ``StepAttention`` over ``store`` (a pass that rewrites stored rows, e.g. ``RewriteAttention``); it has
        ``context_rows`` / ``causal_rows`` as well.
        """
        names = self.branches
        work = Work()
        compute = {b: [decisions[(b, u.id)] for u in units] for b in names}
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, b in enumerate(names):
            groups.setdefault(tuple(i for i, c in enumerate(compute[b]) if c), []).append(row)
        # every branch computing every unit (most steps) makes one forward whose output is the whole buffer;
        # otherwise each position is written once below, by a forward or a reuse (so no copy of h0 is needed)
        h = None if units and list(groups) == [tuple(range(len(units)))] else \
            emb.h0.new_empty((len(names),) + tuple(emb.h0.shape[1:]))
        for which, rows in groups.items():
            if which:
                out = self._forward([units[i] for i in which], [spans[i] for i in which],
                                    [emb.spans[i] for i in which], rows, emb, work, reuse, store, whole, h, kv)
                if h is None:
                    h = out.to(emb.h0.dtype)
        # a reuse relative to another branch's output (CFG-aware delta) runs after that branch's row is written
        for row in sorted(range(len(names)), key=lambda r: reuse.base_branch(names[r]) is not None):
            b, base = names[row], reuse.base_branch(names[row])
            src = emb.h0 if base is None else h[names.index(base):names.index(base) + 1]
            for i, (u, (_, tok)) in enumerate(zip(units, emb.spans)):
                if not compute[b][i]:
                    h[row:row + 1, tok] = reuse.output((b, u.id), src[:, tok], None, work)
        e = emb.e
        kept = self.output_spans(emb, units)
        if kept is not None:  # passes that only wrote K/V need no head
            if not kept:
                _, ph, pw = self.model.cfg.patch_size
                empty = torch.zeros(1, self.model.cfg.out_dim, 0, emb.grid_hw[0] * ph, emb.grid_hw[1] * pw,
                                    device=h.device)
                return {b: empty for b in names}, work
            h = torch.cat([h[:, tok] for _, tok in kept], dim=1)
            e = torch.cat([emb.e[:, fr] for fr, _ in kept], dim=1)
        pt = self.model.cfg.patch_size[0]
        pred = self.model.head_out(h, e.expand(len(names), -1, -1), (e.shape[1] // pt,) + emb.grid_hw,
                                   self.slice_tokens)
        return {b: pred[row:row + 1] for row, b in enumerate(names)}, work

    @staticmethod
    def output_spans(emb: Embedded, units: list[Unit]) -> list[tuple[slice, slice]] | None:
        """The (frames, tokens) spans of the units with ``output``; None when that is every unit."""
        if all(u.output for u in units):
            return None
        return [span for u, span in zip(units, emb.spans) if u.output]

    def output_frames(self, emb: Embedded, units: list[Unit]) -> torch.Tensor:
        """The segment frames ``predict`` returned predictions for, in order."""
        kept = self.output_spans(emb, units)
        return emb.idx if kept is None else torch.cat([emb.idx[fr] for fr, _ in kept])

    def _forward(self, units: list[Unit], spans: list[UnitSpan], tok_spans: list[tuple[slice, slice]],
                 rows: list[int], emb: Embedded, work: Work, reuse: Reuse, store: KVStore | None,
                 whole: WholeWindow | None, h: torch.Tensor | None, kv=None) -> torch.Tensor:
        """One batched forward of ``units`` for the branches at ``rows``; writes their tokens into ``h``
        [branches, L, D] (None: the caller takes the output [rows, L_units, D] as it is) and adds to ``work``
        the call, its forwards' FLOPs and each cacheable unit's backbone residual per branch (``Reuse.output``:
        when the run keeps payloads)."""
        model, cfgm = self.model, self.model.cfg
        if len(tok_spans) == len(emb.spans):  # every unit, in order: the embedding as it is (the blocks copy)
            tokens, mod = emb.h0, emb.e0
        else:
            tokens = torch.cat([emb.h0[:, tok] for _, tok in tok_spans], dim=1)
            mod = torch.cat([emb.e0[:, fr] for fr, _ in tok_spans], dim=1)
        tokens, mod = tokens.expand(len(rows), -1, -1), mod.expand(len(rows), -1, -1, -1)
        ctx = torch.cat([self.contexts[self.branches[r]] for r in rows], dim=0)
        branches = [self.branches[r] for r in rows]
        sizes = [tok.stop - tok.start for _, tok in tok_spans]
        grid = (sum(fr.stop - fr.start for fr, _ in tok_spans) // cfgm.patch_size[0],) + tuple(emb.grid_hw)
        offsets = tuple(s.frame_offset for s in spans)
        if whole is None and kv is None:
            store_rows = slice(None) if len(rows) == len(self.branches) else list(rows)
            kv = StepAttention(store, [u.id for u in units], sizes, store_rows, self.causal)
        text_kv = None if self.text_kv is None else self.text_kv.setdefault(tuple(rows), {})
        fresh_text = text_kv is not None and not text_kv
        out = model.run_blocks(tokens, mod, ctx, grid, offsets, kv, None if whole is None else whole.mask,
                               between=self.cancel, text_kv=text_kv, rope=self.rope(grid, offsets),
                               slice_tokens=self.slice_tokens)
        work.calls += 1
        text_proj = text_projection_flops(cfgm.dim, cfgm.num_layers, ctx.shape[1])
        if fresh_text:  # computed once for these branches: counted once
            work.extra(len(rows) * text_proj)
        start = 0
        for u, (_, tok), n in zip(units, tok_spans, sizes):
            for i, b in enumerate(branches):
                res = reuse.output((b, u.id), emb.h0[:, tok], out[i:i + 1, start:start + n], work, u.cacheable)
                if h is not None:
                    h[rows[i]:rows[i] + 1, tok] = res
                if whole is None:
                    dims = (cfgm.dim, cfgm.ffn_dim, cfgm.num_layers, ctx.shape[1])
                    once = text_proj if text_kv is not None else 0.0  # the text's K/V were not recomputed
                    work.forward(forward_flops(n, kv.context_rows[u.id], *dims) - once,
                                 forward_flops(n, kv.causal_rows[u.id], *dims))
                else:
                    work.forward(*whole.flops[b])
            start += n
        return out
