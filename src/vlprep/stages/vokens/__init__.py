r"""Maria's vokenization: a line corpus and image sets -> the top-5 images of every line (``dialog2img``).

Upstream: jokieleung/Maria ``retrieval_model/`` (``xmatching``, ``tokenization``, ``vokenization``); the
library pieces are ``vlprep.models.matching`` and ``vlprep.data.text_corpus``. Steps (each a component of
the ``vokens`` pipeline; :func:`run` runs them in this process, in the same order):

1. :func:`train` (``training.py``; one pod, all its GPUs through torchrun) -> ``matcher/BEST.pth``, or,
   given a matcher spec, :func:`matcher` checks it and training is skipped;
2. :func:`tokenize_plan` -> :func:`tokenize` (per line range) -> :func:`tokenize_merge` (``tokens.py``):
   ``{corpus}.{tokenizer}``, ``.line``, ``.hdf5``; one entry per input line (``drop_empty``: upstream's files);
3. :func:`keys_plan` -> :func:`keys` (per block of images, GPU) -> :func:`keys_merge` (``keys.py``):
   ``{set}.hdf5``, ``.path``, ``.ids``; undecodable images skipped and listed;
4. :func:`plan` (the index step) -> :func:`vokenize` (per page range, GPU) -> :func:`merge` (``search.py``):
   ``{corpus}.{sets}{.N}`` + ``.ids`` and ``vokens_report.html``.

Layout under the pipeline's ``out`` (:func:`layout`): ``matcher/``, ``tokens/``, ``keys/``, ``vokens/``. Each
step's work (settings, plan, shard parts, done-markers) is under its folder's ``_work/``, named by what it
makes, so one folder holds several corpora or image sets. Every merge concatenates parts in shard order:
the files are the same for any number of shards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from vlprep import stage, storage
from vlprep.models.matching import train as tr
from vlprep.stages.vokens.keys import image_set_for, keys, keys_merge, keys_plan, sets_in
from vlprep.stages.vokens.search import make_settings, merge, plan, vokenize
from vlprep.stages.vokens.settings import (
    REPORT,
    TOKENIZE_BLOCK,
    KeySettings,
    TokenizeSettings,
    VokenizeSettings,
    layout,
)
from vlprep.stages.vokens.tokens import find_tokens, prefix_name, tokenize, tokenize_merge, tokenize_plan
from vlprep.stages.vokens.training import matcher, train, train_job

__all__ = ["REPORT", "KeySettings", "Settings", "TokenizeSettings", "VokenizeSettings", "find_tokens", "image_set_for",
           "keys", "keys_merge", "keys_plan", "layout", "make_settings", "matcher", "merge", "plan", "prefix_name", "run",
           "run_steps", "sets_in", "steps", "tokenize_steps", "keys_steps", "vokenize_steps", "tokenize", "tokenize_merge", "tokenize_plan", "train", "train_job", "vokenize"]


@dataclass(frozen=True)
class Settings:
    """The whole workflow's values (the ``vokens`` pipeline's parameters); ``matcher`` empty = train one."""

    corpus: str
    images: str
    image_set: str
    tokenizer: str
    matcher: str = ""
    config: str = "maria"
    image_root: str = ""
    drop_empty: bool = False
    retrieval_input: str = ""
    key_batch: int = 512
    topk: int = 5
    max_images: int = -1
    block_lines: int = TOKENIZE_BLOCK  # lines per tokenization plan item
    page_lines: int = 512  # entries per vokenization batch (Maria's page)
    train_captions: str = ""  # with an empty matcher: LXMERT JSON(s) or caption jsonl, and their image root
    valid_captions: str = ""
    train_image_root: str = ""
    bert_weights: str = tr.cfg.BERT_BASE_UNCASED
    resnet_weights: str = tr.cfg.RESNEXT101_32X8D_IMAGENET
    train_settings: tr.TrainSettings = field(default_factory=tr.TrainSettings)

    def tokenize_settings(self) -> TokenizeSettings:
        return TokenizeSettings(corpus=self.corpus, tokenizer=self.tokenizer, retrieval_input=self.retrieval_input,
                                drop_empty=self.drop_empty, block_lines=self.block_lines)

    def key_settings(self, out: str) -> KeySettings:
        return KeySettings(images=self.images, image_set=self.image_set, matcher=self.matcher_spec(out),
                           config=self.config, image_root=self.image_root, batch_size=self.key_batch)

    def matcher_spec(self, out: str) -> str:
        """The given matcher, or where :func:`train` writes ``BEST.pth``."""
        return self.matcher or storage.join(layout(out)["matcher"], tr.BEST)

    def job(self, out: str) -> tr.TrainJob:
        return train_job(layout(out)["matcher"], train=self.train_captions, valid=self.valid_captions,
                         image_root=self.train_image_root, config=self.config, tokenizer=self.tokenizer,
                         bert_weights=self.bert_weights, resnet_weights=self.resnet_weights,
                         settings=self.train_settings)


def tokenize_steps(out: str, settings: TokenizeSettings, *, num_shards: int = 1,
                   split: str = "balanced") -> list[stage.Step]:
    """Tokenization into the tokens folder ``out`` (what ``vlprep vokens tokenize`` runs)."""
    name = prefix_name(settings.corpus, settings.tokenizer)
    return [stage.Step("tokenize_plan", lambda: tokenize_plan(out, settings, num_shards=num_shards, split=split)),
            stage.Step("tokenize", tokenize, over="tokenize_plan"),
            stage.Step("tokenize_merge", lambda: tokenize_merge(out, name))]


def keys_steps(out: str, settings: KeySettings, *, num_shards: int = 1, split: str = "balanced",
               runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """One image set's keys into the keys folder ``out`` (``vlprep vokens keys``)."""
    return [stage.Step("keys_plan", lambda: keys_plan(out, settings, num_shards=num_shards, split=split)),
            stage.Step("keys", functools.partial(keys, runtime=runtime), over="keys_plan"),
            stage.Step("keys_merge", lambda: keys_merge(out, settings.image_set))]


def vokenize_steps(out: str, settings: Callable[[], VokenizeSettings], *, num_shards: int = 1,
                   split: str = "balanced", runtime: stage.Runtime | None = None) -> list[stage.Step]:
    """Vokens into the folder ``out`` (``vlprep vokens vokenize``); ``settings()`` is called by the plan step,
    once the tokens and keys it checks exist."""
    made: list[VokenizeSettings] = []

    def plan_step():
        made.append(settings())
        return plan(out, made[0], num_shards=num_shards, split=split)

    return [stage.Step("plan", plan_step),
            stage.Step("vokenize", functools.partial(vokenize, runtime=runtime), over="plan"),
            stage.Step("merge", lambda: merge(out, made[0].tokens.rstrip("/").rsplit("/", 1)[-1]))]


def steps(out: str, settings: Settings, *, tokenize_shards: int = 1, key_shards: int = 1, vokenize_shards: int = 1,
          split: str = "balanced", runtime: stage.Runtime | None = None, nproc: int | None = None) -> list[stage.Step]:
    """The pipeline's steps, in its order (``vlprep_pipelines.vokens``): ``train`` without a matcher (as the
    pipeline's condition), else ``matcher``; then tokenize, keys and vokenize."""
    d, s = layout(out), settings
    first = (stage.Step("matcher", lambda: matcher(s.matcher)) if s.matcher
             else stage.Step("train", lambda: train(s.job(out), nproc)))
    tokens = storage.join(d["tokens"], prefix_name(s.corpus, s.tokenizer))
    return [
        first,
        *tokenize_steps(d["tokens"], s.tokenize_settings(), num_shards=tokenize_shards, split=split),
        *keys_steps(d["keys"], s.key_settings(out), num_shards=key_shards, split=split, runtime=runtime),
        *vokenize_steps(d["vokens"], lambda: make_settings(
            tokens=tokens, keys=d["keys"], matcher=s.matcher_spec(out), config=s.config, image_sets=[s.image_set],
            topk=s.topk, max_images=s.max_images, page_lines=s.page_lines),
            num_shards=vokenize_shards, split=split, runtime=runtime),
    ]


def run_steps(name: str, steps: list[stage.Step]) -> dict:
    """Steps in this process; the last step's result (a merge summary) with how many shards were already done."""
    results = stage.run_local(name, steps)
    skipped = {s.name: stage.skipped(results[s.name]) for s in steps if s.over}
    return {**results[steps[-1].name], "skipped_shards": skipped}


def run(out: str, settings: Settings, **kw) -> dict:
    """The whole workflow in this process: [train], tokenize, keys, vokenize (done shards skipped), merge."""
    return run_steps("vokens", steps(out, settings, **kw))
