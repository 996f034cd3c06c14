"""The BERT tokenizer of the matcher, and how Maria encodes captions and vokenizer queries.

A tokenizer spec is a Hugging Face name (``bert-base-uncased``; offline it must be in the HF cache), a
local folder that ``AutoTokenizer.from_pretrained`` accepts (e.g. ``vocab.txt`` + ``tokenizer_config.json``),
or a WordPiece ``vocab.txt`` file given as a path, URL or gs:// spec (lower-cased, as bert-base-uncased).
Always the fast (Rust ``tokenizers``) implementation, as Maria's ``AutoTokenizer(use_fast=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlprep import VlprepError
from vlprep.models import weights as wts


def load_tokenizer(spec: str = "bert-base-uncased"):
    """A fast BERT tokenizer."""
    from transformers import AutoTokenizer, BertTokenizer

    spec = str(spec)
    try:
        if spec.endswith(".txt"):
            tok = BertTokenizer(vocab=str(wts.resolve(spec).path), do_lower_case=True)  # transformers 5: fast
        else:
            tok = AutoTokenizer.from_pretrained(spec, use_fast=True)
    except (OSError, ValueError) as e:
        raise VlprepError(f"tokenizer {spec!r}: {e}. Offline, pass a folder holding vocab.txt (and "
                          "tokenizer_config.json) or a vocab.txt file.") from None
    if not tok.is_fast or tok.cls_token_id is None or tok.sep_token_id is None or tok.pad_token_id is None:
        raise VlprepError(f"tokenizer {spec!r}: not a fast BERT-style tokenizer with [CLS], [SEP] and [PAD]")
    return tok


def tokenizer_label(spec: str) -> str:
    """The tokenizer's name in Maria's file names (``{corpus}.{label}.hdf5``): the HF name or folder name."""
    spec = str(spec).rstrip("/")
    name = spec.rsplit("/", 1)[-1]
    if spec.endswith(".txt"):
        name = spec.rsplit("/", 2)[-2] if "/" in spec else Path(spec).stem
    return name


def encode_ids(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each text without special tokens (int32), batched on the Rust backend.

    Same ids as upstream's per-line ``convert_tokens_to_ids(tokenize(line))``: special-token text such
    as ``[SEP]`` maps to its id, control characters and a BOM are dropped, newlines are whitespace.
    """
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()  # a padded/truncated call (encode_captions) leaves both set on the backend
    backend.no_padding()
    encodings = backend.encode_batch_fast(list(texts), add_special_tokens=False)  # no offsets: ids only
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]


def encode_captions(tokenizer, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training input as Maria's ``encode_plus``: [CLS] ids [SEP], truncated and padded to ``max_len``."""
    enc = tokenizer(list(texts), add_special_tokens=True, max_length=max_len, truncation=True,
                    padding="max_length", return_tensors="pt", return_token_type_ids=False)
    return enc["input_ids"], enc["attention_mask"]
