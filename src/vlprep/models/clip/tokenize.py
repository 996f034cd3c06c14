"""Text tokens as each upstream did them (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlprep import VlprepError
from vlprep.models.clip.recipes import CONTEXT_LENGTH, XC_TOKEN_LIMIT


def _hf_clean(text: str) -> str:
    """HF 4.17 slow ``CLIPTokenizer`` cleaning with ftfy installed (no extra ``html.unescape``)."""
    import ftfy
    import regex

    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


_TOKENIZERS: dict[str, object] = {}


def _simple_tokenizer(kind: str):
    if kind not in _TOKENIZERS:
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer(context_length=CONTEXT_LENGTH)
        if kind == "hf-75":
            tok.clean_fn = _hf_clean
        _TOKENIZERS[kind] = tok
    return _TOKENIZERS[kind]


def tokenize(texts: Sequence[str], kind: str) -> torch.Tensor:
    """Token ids (N, L), right-padded with 0 to the longest sequence.

    ``hf-75``: XC (``[BOS] ids [EOS]`` cut to 75 tokens). ``openai-77``: HAAV (``clip.tokenize``; a text
    over 77 tokens is cut and ends in EOT). L is the batch's longest sequence, at most 75 / 77.
    """
    if kind not in ("hf-75", "openai-77"):
        raise VlprepError(f"unknown tokenizer {kind!r}; use 'hf-75' or 'openai-77'")
    tok = _simple_tokenizer(kind)
    seqs = []
    for text in texts:
        ids = [tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id]
        if kind == "hf-75":
            ids = ids[:XC_TOKEN_LIMIT]
        elif len(ids) > CONTEXT_LENGTH:
            ids = ids[:CONTEXT_LENGTH]
            ids[-1] = tok.eot_token_id
        seqs.append(ids)
    out = torch.zeros((len(seqs), max((len(s) for s in seqs), default=0)), dtype=torch.long)
    for i, ids in enumerate(seqs):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
