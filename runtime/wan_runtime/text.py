"""Prompt -> UMT5 embeddings, as diffusers' ``WanPipeline._get_t5_prompt_embeds`` does it.

Positive and negative prompts go through :func:`encode_prompts` in one batch: pass
``prompts + negative_prompts`` and split the result in two.
"""
from __future__ import annotations

import functools
import html
import pathlib
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer as _Backend

from .models import umt5

# diffusers collapses whitespace with the third-party ``regex`` module, whose \s is Unicode White_Space;
# stdlib re's \s also matches \x1c-\x1f, so the class is spelled out.
_WHITESPACE = re.compile("[\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


try:  # optional, as in diffusers: mojibake repair before tokenizing when ftfy is installed
    import ftfy as _ftfy
except ImportError:
    _ftfy = None


def prompt_clean(text: str) -> str:
    """diffusers' ``prompt_clean``: ``ftfy.fix_text`` when ftfy is installed (diffusers does the same),
    html-unescape twice, strip, collapse whitespace, strip."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class Tokenizer:
    """A ``tokenizer.json`` (``tokenizers`` library) called the way diffusers calls the T5 tokenizer."""

    def __init__(self, backend: _Backend, pad_token: str = "<pad>"):
        self.backend = backend
        self.pad_token = pad_token
        self.pad_id = backend.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")

    @classmethod
    def from_file(cls, path: str | pathlib.Path, pad_token: str = "<pad>") -> "Tokenizer":
        return cls(_Backend.from_file(str(path)), pad_token)

    def tokenize(self, prompts: Sequence[str], max_length: int = 512, *, return_truncated: bool = False):
        """-> input_ids, mask: int32 (B, max_length) [, truncated: bool (B,)].

        As ``tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
        add_special_tokens=True)``: the post-processor appends ``</s>`` (kept when truncating).
        """
        tok = self.backend
        tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
        tok.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token, length=max_length)
        encs = tok.encode_batch(list(prompts), add_special_tokens=True)
        ids = np.array([e.ids for e in encs], np.int32).reshape(len(encs), max_length)
        mask = np.array([e.attention_mask for e in encs], np.int32).reshape(len(encs), max_length)
        if return_truncated:
            return ids, mask, np.array([bool(e.overflowing) for e in encs], bool)
        return ids, mask


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _embed(params, cfg: umt5.UMT5Config, input_ids, mask, dtype):
    """(B, S) -> (B, S, d), one prompt at a time: XLA's row reductions (norms, softmax) round
    differently with the batch size, and a prompt's embedding must not depend on its batch-mates."""
    def one(args):
        ids, m = args  # (S,)
        h = umt5.encode(params, cfg, ids[None], m[None], dtype=dtype)[0]  # (S, d)
        keep = jnp.arange(ids.shape[0]) < m.sum()  # position < real token count
        return jnp.where(keep[:, None], h, 0.0)

    return jax.lax.map(one, (input_ids, mask))


def encode_prompts(params: Mapping[str, Any], cfg: umt5.UMT5Config, tokenizer: Tokenizer, prompts: Sequence[str],
                   max_length: int = 512, dtype=jnp.float32):
    """prompts (B) -> (embeddings float32 (B, max_length, d), token counts int (B,), truncated bool (B,)).

    Each prompt is cleaned, tokenized to ``max_length`` and encoded with its padding mask; positions
    at and after its token count are zero, as in diffusers.
    """
    ids, mask, truncated = tokenize_prompts(tokenizer, prompts, max_length)
    emb = _embed(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.dtype(dtype))
    return emb, mask.sum(axis=1), truncated


def tokenize_prompts(tokenizer: Tokenizer, prompts: Sequence[str], max_length: int = 512):
    """The host half of :func:`encode_prompts`: (ids, mask, truncated) of the cleaned prompts."""
    return tokenizer.tokenize([prompt_clean(p) for p in prompts], max_length, return_truncated=True)


def embed_tokens(params, cfg: umt5.UMT5Config, ids, mask, dtype):
    """The device half of :func:`encode_prompts` (jittable; zero past each prompt's token count)."""
    return _embed.__wrapped__(params, cfg, ids, mask, dtype)
