"""Text encoders for the pack's models, host-independent (never imports ComfyUI).

``t5``: a T5 v1.1 encoder that reads ComfyUI's T5-XXL files (MAGI-1's text encoder) and a ``tokenizers``-based
T5 tokenizer. ``magi_text``: MAGI-1's caption cleaning, special tokens and per-chunk captions. See
README_magi_text.md for what users need and where it goes.
"""
from .magi_text import (SPECIAL_TOKENS_FILENAME, SPECIAL_TOKENS_HELP, MagiSpecialTokens, clean_caption,
                        encode_magi_prompt, find_magi_special_tokens, load_magi_special_tokens,
                        magi_chunk_captions, prepend_token)
from .t5 import (MAGI_TEXT_LENGTH, T5Config, T5Encoder, T5Tokenizer, build_t5_encoder, encode_ids,
                 load_t5_encoder, pad_ids, t5_config_from_state_dict)

__all__ = ["T5Config", "T5Encoder", "T5Tokenizer", "load_t5_encoder", "build_t5_encoder", "encode_ids", "pad_ids",
           "t5_config_from_state_dict", "MAGI_TEXT_LENGTH", "MagiSpecialTokens", "load_magi_special_tokens",
           "find_magi_special_tokens", "magi_chunk_captions", "prepend_token", "clean_caption",
           "encode_magi_prompt", "SPECIAL_TOKENS_FILENAME", "SPECIAL_TOKENS_HELP"]
