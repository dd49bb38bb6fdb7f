"""DemoTextEncoder: a word-level text encoder over the demo vocabulary, trained with the demo model.

A prompt is lower-cased and split into words; each word maps to a row of a learned embedding table
[V, text_dim], plus a learned position embedding; the result is zero padded to ``text_len`` (16) rows,
like umT5 states padded for Wan. The empty prompt gives all zeros (the negative / unconditional input).
Words outside the vocabulary raise ``InputError`` listing the vocabulary.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from safetensors import safe_open

from ..checkpoint import save_safetensors
from ..errors import CheckpointError, InputError

ALIASES = {"color": "colour", "grey": "gray", "an": "a", "the": "a"}


def tokenize(prompt: str) -> list[str]:
    words = re.findall(r"[a-z]+", prompt.lower())
    return [ALIASES.get(w, w) for w in words]


class DemoTextEncoder(nn.Module):
    def __init__(self, vocabulary: Sequence[str], text_dim: int = 64, text_len: int = 16):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.text_dim, self.text_len = text_dim, text_len
        self.token = nn.Embedding(len(self.vocabulary), text_dim)
        self.position = nn.Parameter(torch.zeros(text_len, text_dim))
        nn.init.normal_(self.token.weight, std=1.0)
        nn.init.normal_(self.position, std=0.1)

    def ids(self, prompt: str) -> list[int]:
        words = tokenize(prompt)
        unknown = [w for w in words if w not in self.index]
        if unknown:
            words_given = ", ".join(repr(w) for w in dict.fromkeys(unknown))
            raise InputError(f"demo text encoder: unknown word(s) {words_given}; expected only words the demo model "
                             "knows, e.g. 'a red circle bouncing on a blue background'. All of them: "
                             f"{' '.join(self.vocabulary)}.")
        if len(words) > self.text_len:
            raise InputError(f"demo text encoder: {len(words)} words; expected at most {self.text_len}.")
        return [self.index[w] for w in words]

    def encode_ids(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token id lists -> [B, text_len, text_dim], zero padded (differentiable)."""
        out = self.position.new_zeros(len(batch), self.text_len, self.text_dim)
        rows = [(b, i, t) for b, ids in enumerate(batch) for i, t in enumerate(ids)]
        if rows:
            bi = torch.tensor([r[0] for r in rows])
            pi = torch.tensor([r[1] for r in rows])
            ti = torch.tensor([r[2] for r in rows])
            out = out.index_put((bi, pi), self.token(ti) + self.position[pi])
        return out

    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [1, text_len, text_dim] fp32; "" -> zeros."""
        with torch.no_grad():
            return self.encode_ids([self.ids(prompt)]).detach().float()

    forward = encode

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
        path = Path(path)
        meta = {"flowcache.vocabulary": json.dumps(self.vocabulary), "flowcache.text_len": str(self.text_len),
                "flowcache.text_dim": str(self.text_dim)}
        meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
        return save_safetensors({"token.weight": self.token.weight.detach().float().contiguous(),
                                 "position": self.position.detach().float().contiguous()}, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DemoTextEncoder":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: demo text encoder file is missing.")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            vocab = json.loads(meta["flowcache.vocabulary"])
        except Exception as e:
            raise CheckpointError(f"{path.name}: not a demo text encoder file ({e}).") from e
        enc = cls(vocab, tensors["token.weight"].shape[1], int(meta.get("flowcache.text_len", 16)))
        enc.load_state_dict({"token.weight": tensors["token.weight"], "position": tensors["position"]})
        return enc.eval().requires_grad_(False)
