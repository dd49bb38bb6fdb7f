"""MAGI-1's prompt path around the T5 encoder: caption cleaning, the special tokens, per-chunk captions.

What MAGI-1 does (``inference/pipeline/prompt_process.py``, ``inference/pipeline/video_generate.py``,
``inference/model/t5/t5_model.py``; the project reference, sections 2.9 and 4):

1. The prompt is normalised twice by a DeepFloyd/PixArt-style caption cleaner (lower case, URLs, HTML, @handles,
   CJK characters, dashes and quotes, stray punctuation, ...) - ``clean_caption`` here.
2. T5 v1.1 XXL encodes it to 800 tokens with the attention mask (``flowcache.text.t5``).
3. The caption is repeated for each chunk to denoise. With ``PAD_HQ=1`` and ``PAD_DURATION=1`` (set by the
   official run.sh and by the official ComfyUI node) two 4096-d vectors from ``example/assets/special_tokens.npz``
   are put in front of each chunk's caption, mask 1, and the result is cut back to 800 rows:
   ``[DURATION_k, HQ, caption...]`` with ``HQ = other_tokens[1]`` and
   ``DURATION_k = other_tokens[7 + min(chunks_left_after_this_one, 7)]``.
   The npz values are float64 and are cast to fp16 before use; ``MagiSpecialTokens`` does the same rounding.
4. Clean (prefix) chunks and the unconditional branch use the DiT's own ``null_caption_embedding``, not these.

The special tokens are not T5 outputs of any string: the npz holds 102 vectors (``caption_token``,
``logo_token``, ``other_tokens[0..99]``) whose entries look like independent Gaussian draws (std 0.125, kurtosis
3.0, pairwise cosine |c| < 0.06, no shared direction), unlike T5 states of text. The code only ever loads them.
So they cannot be recomputed and have to be read from the released file (Apache-2.0, in MAGI-1's GitHub repo);
it is not bundled here. Using them is optional in MAGI's code (environment switches) but on in every official
run, so the default here is to require the file.

Never imports ComfyUI.
"""
from __future__ import annotations

import html
import os
import re
import urllib.parse
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from .t5 import MAGI_TEXT_LENGTH, T5Encoder, T5Tokenizer, encode_ids

SPECIAL_TOKENS_FILENAME = "magi1_special_tokens.npz"
SPECIAL_TOKENS_HELP = (
    "MAGI-1's special tokens file is needed: download 'example/assets/special_tokens.npz' from the MAGI-1 GitHub "
    "repository (SandAI-org/MAGI-1, Apache-2.0) and save it as "
    f"ComfyUI/models/text_encoders/{SPECIAL_TOKENS_FILENAME}.")

# Row indices in ``other_tokens`` (MAGI-1 prompt_process.py).
OTHER_TOKEN_ROWS = {
    "TRANS_TOKEN": 0, "HQ_TOKEN": 1, "STATIC_FIRST_FRAMES_TOKEN": 2, "DYNAMIC_FIRST_FRAMES_TOKEN": 3,
    "BORDERNESS_TOKEN": 4, "THREE_D_MODEL_TOKEN": 15, "TWO_D_ANIME_TOKEN": 16,
}
DURATION_FIRST_ROW = 7   # DURATION rows 7..14: "N chunks remain" for N = 1..8 (capped)
DURATION_COUNT = 8


# --------------------------------------------------------------------------------------------- caption cleaning
class _TextOnly(HTMLParser):
    """Text content of an HTML fragment, entities decoded (what BeautifulSoup's ``.text`` gives)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(s: str) -> str:
    p = _TextOnly()
    try:
        p.feed(s)
        p.close()
    except AssertionError:  # html.parser's complaint about a malformed marked section: keep the text as it was
        return s
    return "".join(p.parts)


def _fix_text(s: str) -> str:
    try:
        import ftfy  # optional: MAGI runs ftfy.fix_text; for ordinary prompts it changes nothing
    except ImportError:
        return s
    return ftfy.fix_text(s)


_URL_TLDS = r"(?:com|co|ru|net|org|edu|gov|it)"
_RULES_BEFORE_HTML = [
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.]" + _URL_TLDS + r"[\w/-]*\b\/?(?!@)))", ""),
]
_DASHES = ("\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0"
           "\uFE31\uFE32\uFE58\uFE63\uFF0D")
_RULES_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),                                       # @handles
    # CJK strokes, katakana ext., enclosed CJK, CJK compatibility, ext. A, hexagrams, unified ideographs
    (r"[\u31c0-\u31ef]+", ""), (r"[\u31f0-\u31ff]+", ""), (r"[\u3200-\u32ff]+", ""), (r"[\u3300-\u33ff]+", ""),
    (r"[\u3400-\u4dbf]+", ""), (r"[\u4dc0-\u4dff]+", ""), (r"[\u4e00-\u9fff]+", ""),
    ("[" + _DASHES + "]+", "-"),                               # every dash -> "-"
    (r"[`´«»“”¨]", '"'), (r"[‘’]", "'"),                       # quotes
    (r"&quot;?", ""), (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),              # IP addresses
    (r"\d:\d\d\s+$", ""),                                      # trailing article ids
    (r"\\n", " "),                                             # a literal backslash-n
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", r'"'), (r"[\.]{2,}", r" "),
    (r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+", r" "),                 # stray punctuation
    (r"\s+\.\s+", r" "),
]
_RULES_AFTER_FIX = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""), (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""), (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),                      # sizes like 1920x1080
    (r"\b\s+\:\s+", r": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
]
_RULES_FINAL = [
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", r""), (r"[\'\_,\-\:\-\+]$", r""), (r"^\.\S+$", ""),
]
_COMPILED = {name: [(re.compile(p), r) for p, r in rules] for name, rules in
             (("before", _RULES_BEFORE_HTML), ("after", _RULES_AFTER_HTML), ("fix", _RULES_AFTER_FIX),
              ("final", _RULES_FINAL))}
_SEPARATORS = re.compile(r"(?:\-|\_)")


def _apply(rules, s: str) -> str:
    for rx, rep in rules:
        s = rx.sub(rep, s)
    return s


def clean_caption_once(caption: str) -> str:
    """One pass of the caption normalisation MAGI-1's T5Embedder applies (DeepFloyd/PixArt style)."""
    s = urllib.parse.unquote_plus(str(caption)).strip().lower()
    s = _apply(_COMPILED["before"], s)
    s = _html_text(s)
    s = _apply(_COMPILED["after"], s)
    if len(_SEPARATORS.findall(s)) > 3:   # this-is-a-slug / this_is_a_slug
        s = _SEPARATORS.sub(" ", s)
    s = html.unescape(html.unescape(_fix_text(s))).strip()
    s = _apply(_COMPILED["fix"], s)
    s = _apply(_COMPILED["final"], s)
    return s.strip()


def clean_caption(caption: str) -> str:
    """MAGI-1 cleans every prompt twice before tokenising."""
    return clean_caption_once(clean_caption_once(caption))


# --------------------------------------------------------------------------------------------- special tokens
@dataclass
class MagiSpecialTokens:
    """The released ``special_tokens.npz``, as fp16-rounded float32 tensors like MAGI uses them."""

    caption_token: torch.Tensor   # [1, 4096]
    logo_token: torch.Tensor      # [1, 4096]
    other_tokens: torch.Tensor    # [100, 4096]
    source: str = "special_tokens.npz"

    @property
    def dim(self) -> int:
        return int(self.other_tokens.shape[-1])

    def named(self, key: str) -> torch.Tensor:
        """One token [1, dim] by MAGI's name (CAPTION_TOKEN, LOGO_TOKEN, HQ_TOKEN, ..., DURATION_TOKEN_1..8)."""
        if key == "CAPTION_TOKEN":
            return self.caption_token
        if key == "LOGO_TOKEN":
            return self.logo_token
        if key in OTHER_TOKEN_ROWS:
            r = OTHER_TOKEN_ROWS[key]
            return self.other_tokens[r:r + 1]
        m = re.fullmatch(r"DURATION_TOKEN_(\d+)", key)
        if m and 1 <= int(m.group(1)) <= DURATION_COUNT:
            r = DURATION_FIRST_ROW + int(m.group(1)) - 1
            return self.other_tokens[r:r + 1]
        raise KeyError(f"unknown MAGI-1 special token {key!r}")

    @property
    def hq(self) -> torch.Tensor:
        return self.named("HQ_TOKEN")

    def duration(self, chunks_after: int) -> torch.Tensor:
        """The duration token for a chunk followed by ``chunks_after`` more chunks (capped at 7)."""
        r = DURATION_FIRST_ROW + min(max(int(chunks_after), 0), DURATION_COUNT - 1)
        return self.other_tokens[r:r + 1]

    @classmethod
    def from_arrays(cls, caption_token, logo_token, other_tokens, source: str = "arrays") -> "MagiSpecialTokens":
        arrays = {"caption_token": caption_token, "logo_token": logo_token, "other_tokens": other_tokens}
        out = {}
        for k, a in arrays.items():
            a = np.asarray(a)
            if a.dtype.kind != "f" or a.ndim != 2:
                raise CheckpointError(f"{source}: '{k}' must be a 2-D float array, got {a.dtype} {a.shape}.")
            # MAGI: torch.tensor(arr.astype(np.float16)); used in the caption's dtype afterwards.
            out[k] = torch.from_numpy(a.astype(np.float16).astype(np.float32))
        dim = out["other_tokens"].shape[1]
        if out["caption_token"].shape != (1, dim) or out["logo_token"].shape != (1, dim):
            raise CheckpointError(f"{source}: caption_token/logo_token must be [1, {dim}], got "
                                  f"{tuple(out['caption_token'].shape)} and {tuple(out['logo_token'].shape)}.")
        if out["other_tokens"].shape[0] < DURATION_FIRST_ROW + DURATION_COUNT:
            raise CheckpointError(f"{source}: other_tokens has {out['other_tokens'].shape[0]} rows; MAGI-1 uses rows "
                                  f"up to {DURATION_FIRST_ROW + DURATION_COUNT - 1} (the released file has 100).")
        return cls(out["caption_token"], out["logo_token"], out["other_tokens"], source)


def load_magi_special_tokens(path: str | os.PathLike) -> MagiSpecialTokens:
    """Read the released ``special_tokens.npz`` (no pickles). A missing or wrong file says where to put it."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: not found. {SPECIAL_TOKENS_HELP}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("caption_token", "logo_token", "other_tokens") if k not in z.files]
            if missing:
                raise CheckpointError(f"{p.name}: holds {sorted(z.files)}, not MAGI-1's special tokens (missing "
                                      f"{', '.join(missing)}). {SPECIAL_TOKENS_HELP}")
            return MagiSpecialTokens.from_arrays(z["caption_token"], z["logo_token"], z["other_tokens"], p.name)
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # not a zip, pickled arrays, truncated
        raise CheckpointError(f"{p.name}: could not be read as MAGI-1's special_tokens.npz ({type(e).__name__}: "
                              f"{e}). {SPECIAL_TOKENS_HELP}") from e


def find_magi_special_tokens(folders, names=(SPECIAL_TOKENS_FILENAME, "special_tokens.npz")) -> Path | None:
    """The first existing special-tokens file in ``folders`` (the node passes ComfyUI's text_encoders folders)."""
    for folder in folders:
        for name in names:
            cand = Path(folder) / name
            if cand.is_file():
                return cand
    return None


def prepend_token(caption: torch.Tensor, mask: torch.Tensor, token: torch.Tensor,
                  max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAGI's ``_pad_special_token``: put ``token`` [1, C] in front of every caption row set, mask 1, and cut
    back to ``max_length`` (the input length by default). caption [..., L, C], mask [..., L]."""
    L = caption.shape[-2] if max_length is None else max_length
    tok = token.to(caption.device, caption.dtype).expand(*caption.shape[:-2], 1, caption.shape[-1])
    cap = torch.cat([tok, caption], dim=-2)[..., :L, :]
    ones = torch.ones(*mask.shape[:-1], 1, dtype=mask.dtype, device=mask.device)
    return cap, torch.cat([ones, mask], dim=-1)[..., :L]


def magi_chunk_captions(caption: torch.Tensor, mask: torch.Tensor, num_chunks: int,
                        special_tokens: MagiSpecialTokens | None, hq: bool = True,
                        duration: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-chunk captions of the chunks to denoise, as MAGI-1 builds them with PAD_HQ=1 PAD_DURATION=1.

    caption [1, L, C] (or [L, C]), mask [1, L] -> ([1, n, L, C], [1, n, L]); chunk i (0-based) gets
    ``[DURATION(n - 1 - i), HQ, caption[:L-2]]``. ``special_tokens=None`` (or hq/duration False) leaves the
    caption as it is, which MAGI allows only with its switches off. Clean prefix chunks are not included: they
    take the DiT's null caption.
    """
    if caption.dim() == 2:
        caption = caption[None]
    if mask.dim() == 1:
        mask = mask[None]
    if caption.dim() != 3 or caption.shape[0] != 1 or mask.shape != caption.shape[:2]:
        raise InputError(f"magi_chunk_captions: expected caption [1, L, C] and mask [1, L], got "
                         f"{tuple(caption.shape)} and {tuple(mask.shape)}.")
    if num_chunks < 1:
        raise InputError(f"magi_chunk_captions: num_chunks must be >= 1, got {num_chunks}.")
    if special_tokens is not None and special_tokens.dim != caption.shape[-1]:
        raise InputError(f"special tokens are {special_tokens.dim}-d but the caption is {caption.shape[-1]}-d "
                         "(MAGI-1 uses T5-XXL, 4096).")
    cap = caption[:, None].expand(1, num_chunks, *caption.shape[1:]).clone()
    m = mask[:, None].expand(1, num_chunks, mask.shape[1]).clone()
    if special_tokens is None:
        return cap, m
    if hq:
        cap, m = prepend_token(cap, m, special_tokens.hq)
    if duration:
        caps, masks = [], []
        for i in range(num_chunks):
            c, mm = prepend_token(cap[:, i:i + 1], m[:, i:i + 1], special_tokens.duration(num_chunks - 1 - i))
            caps.append(c)
            masks.append(mm)
        cap, m = torch.cat(caps, dim=1), torch.cat(masks, dim=1)
    return cap, m


# --------------------------------------------------------------------------------------------- end to end
@torch.no_grad()
def encode_magi_prompt(prompt: str, encoder: T5Encoder, tokenizer: T5Tokenizer,
                       max_length: int = MAGI_TEXT_LENGTH, clean: bool = True,
                       full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt -> (T5 states [1, 800, 4096] fp32, mask [1, 800]) as MAGI's ``get_txt_embeddings`` makes them
    (before the per-chunk special tokens). ``clean``: MAGI's caption cleaning (on in MAGI)."""
    text = clean_caption(prompt) if clean else prompt.lower().strip()
    ids, mask = tokenizer(text, max_length)
    return encode_ids(encoder, ids, mask, full=full)


__all__ = ["clean_caption", "clean_caption_once", "MagiSpecialTokens", "load_magi_special_tokens",
           "find_magi_special_tokens", "prepend_token", "magi_chunk_captions", "encode_magi_prompt",
           "SPECIAL_TOKENS_FILENAME", "SPECIAL_TOKENS_HELP", "OTHER_TOKEN_ROWS"]
