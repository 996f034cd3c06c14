"""What each vokenization step computes (fixed at its plan), where its work lives, and the output layout.

Each step has its own output folder (as Maria's: tokens beside the corpus, ``{load}/keys``,
``{load}/vokens``) and keeps its work under ``{folder}/_work/<step>/<name>/``, named by what it makes, so
that one folder can hold several corpora (valid, test, train) or image sets, each with its own plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from vlprep import VlprepError, stage, storage
from vlprep.models import weights as wts
from vlprep.models.matching.config import BERT_BASE_UNCASED, CONFIGS
from vlprep.models.matching.keys import UPSTREAM_KEY_BATCH
from vlprep.models.matching.vokenize import PAGE_LINES, TOPK

REPORT = "vokens_report.html"
TOKENIZE_BLOCK = 1 << 16  # lines per plan item; shards are whole blocks


def layout(out: str) -> dict[str, str]:
    """The pipeline's folders under one ``out`` (Maria's ``{load}/keys`` and ``{load}/vokens``)."""
    return {name: storage.join(out, name) for name in ("matcher", "tokens", "keys", "vokens")}


def corpus_name(corpus: str) -> str:
    return PurePosixPath(str(corpus).rstrip("/")).name


def is_random(matcher: str) -> bool:
    return wts.parse_random_spec(str(matcher)) is not None


def check_config(config: str) -> str:
    if config not in CONFIGS:
        raise VlprepError(f"matcher config {config!r}: use one of {', '.join(CONFIGS)}")
    return config


@dataclass(frozen=True)
class TokenizeSettings(stage.Settings):
    corpus: str  # one line corpus file (Maria's Reddit ``{split}.pkl.txt``)
    tokenizer: str = BERT_BASE_UNCASED  # HF name, folder or vocab.txt (vlprep.models.matching.tokenizer)
    retrieval_input: str = ""  # whole | context; "" = by file name (valid/test: context, as Maria)
    drop_empty: bool = False  # drop lines without tokens, as upstream (merge only)
    block_lines: int = TOKENIZE_BLOCK

    SHARD_FIELDS = ("corpus", "tokenizer", "retrieval_input", "block_lines")


@dataclass(frozen=True)
class KeySettings(stage.Settings):
    images: str  # image folder, ids file (``{set}.ids``, with image_root) or LXMERT JSON (with image_root)
    image_set: str  # the set's name: ``{set}.hdf5`` / ``.path`` / ``.ids``
    matcher: str  # BEST.pth spec or random:<seed>
    config: str = "maria"
    image_root: str = ""
    batch_size: int = UPSTREAM_KEY_BATCH  # key batches are cut at its multiples in the whole set


@dataclass(frozen=True)
class VokenizeSettings(stage.Settings):
    tokens: str  # tokens prefix ``{dir}/{corpus}.{tokenizer}``
    corpus: str  # the corpus file name in Maria's vokens file name
    tokenizer: str  # spec: its [CLS] / [SEP] / [PAD] ids wrap the queries
    keys: str  # keys folder
    image_sets: tuple[str, ...]  # sorted, as Maria concatenates them
    matcher: str
    config: str = "maria"
    topk: int = TOPK
    max_images: int = -1  # the first N key rows (-1: all)
    page_lines: int = PAGE_LINES  # entries per batch (Maria's page); shards are whole pages


def tokenize_stage(prefix_name: str) -> stage.Stage:
    """Work of one tokenized corpus: ``{tokens dir}/_work/vokens_tokenize/{corpus}.{tokenizer}``."""
    return stage.Stage(f"vokens_tokenize/{prefix_name}", TokenizeSettings)


def keys_stage(image_set: str) -> stage.Stage:
    """Work of one image set: ``{keys dir}/_work/vokens_keys/{set}``."""
    return stage.Stage(f"vokens_keys/{image_set}", KeySettings)


def vokenize_stage(prefix_name: str) -> stage.Stage:
    """Work of one corpus's vokens: ``{vokens dir}/_work/vokens/{corpus}.{tokenizer}``."""
    return stage.Stage(f"vokens/{prefix_name}", VokenizeSettings)
