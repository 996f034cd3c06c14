"""Training Maria's matcher (``xmatching/main.py`` + ``scripts/run_xmatching.bash``), resumable.

Recipe: frozen backbones, trainable heads; ``sent_paired_hinge_rank_loss`` (margin 0.5, summed); Adam,
lr 1e-3, no schedule or weight decay; global batch 512 split over the processes (``drop_last``);
25 epochs; gradient norm clipped at 5; captions encoded to 75 tokens; train images
RandomResizedCrop(224) + flip, validation images Resize(256) + CenterCrop(224); validation batches of
256 (``drop_last``) over the validation pairs shuffled once with ``random.seed(9595)``; the epoch
with the lowest validation loss is written as ``BEST.pth`` (Maria's state-dict layout). As in Maria,
BERT's dropout is active while training, a training image that cannot be read is replaced by the
pair 95 positions further on, and the sampler is never re-seeded per epoch (every epoch sees the same
order; ``reshuffle_each_epoch=True`` changes that).

Processes: one per GPU under ``torchrun`` (``WORLD_SIZE > 1``: ``torch.distributed``, NCCL on GPUs,
gloo on CPU, DDP without buffer broadcast); a plain single process otherwise. Entry point:
``torchrun --nproc_per_node=N -m vlprep.models.matching.train JOB.json`` (``TrainJob`` as JSON).

Outputs under ``out`` (local or gs://, every file written atomically by rank 0):
- ``checkpoint.pth`` after every epoch: epochs done, head weights, optimizer, best loss, history and a
  fingerprint of the job; a rerun resumes after the last completed epoch (a killed epoch is redone),
  and refuses a checkpoint of a different job. Each epoch's RNG is seeded from (seed, epoch, rank), so a
  resumed run continues exactly as an uninterrupted one would;
- ``BEST.pth`` (+ ``BEST.json``: epoch and validation metrics) whenever validation loss improves;
- ``metrics.json``: the per-epoch history.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from vlprep import VlprepError, storage
from vlprep.data import images as imgs
from vlprep.data.lxmert_json import Pair, jsonl_pairs, lxmert_pairs
from vlprep.models.matching import config as cfg
from vlprep.models.matching.config import TrainSettings
from vlprep.models.matching.images import eval_transform, read_rgb, train_transform
from vlprep.models.matching.loss import sent_batchwise_recall, sent_paired_hinge_rank_loss
from vlprep.models.matching.model import Matcher, build_matcher, maria_state_dict
from vlprep.models.matching.tokenizer import encode_captions, load_tokenizer
from vlprep.progress import Progress

log = logging.getLogger(__name__)

CHECKPOINT, BEST, BEST_INFO, METRICS = "checkpoint.pth", "BEST.pth", "BEST.json", "metrics.json"
VALID_SHUFFLE_SEED = 9595
BAD_IMAGE_STEP, BAD_IMAGE_TRIES = 95, 20


@dataclass(frozen=True)
class TrainJob:
    """Everything a training run needs; JSON-serialisable for the torchrun entry point.

    ``train``/``valid``: ``{"lxmert": [uri, ...], "image_root": uri}`` (LXMERT JSON, COCO folders) or
    ``{"jsonl": uri, "image_root": uri}`` (vlprep caption jsonl).
    """

    out: str
    train: dict
    valid: dict
    config: str | dict = "maria"
    tokenizer: str = cfg.BERT_BASE_UNCASED
    bert_weights: str = cfg.BERT_BASE_UNCASED
    resnet_weights: str = cfg.RESNEXT101_32X8D_IMAGENET
    settings: TrainSettings = field(default_factory=TrainSettings)

    @classmethod
    def from_dict(cls, doc: dict) -> TrainJob:
        known = {f.name for f in fields(cls)}
        if set(doc) - known:
            raise VlprepError(f"training job: unknown keys {sorted(set(doc) - known)}")
        settings = TrainSettings(**doc.get("settings", {}))
        return cls(**{**doc, "settings": settings})

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """What a checkpoint must agree on to be resumed (the epoch count and workers may change)."""
        settings = {k: v for k, v in asdict(self.settings).items() if k not in ("epochs", "num_workers")}
        return json.loads(json.dumps({"train": self.train, "valid": self.valid, "config": cfg.get_config(self.config).to_dict(),
                "tokenizer": self.tokenizer, "bert_weights": self.bert_weights,
                "resnet_weights": self.resnet_weights, "settings": settings}))


def load_pairs(source: dict) -> list[Pair]:
    if "lxmert" in source:
        return lxmert_pairs(list(source["lxmert"]), source["image_root"])
    if "jsonl" in source:
        return jsonl_pairs(source["jsonl"], source["image_root"])
    raise VlprepError(f"training data {source!r}: give {{'lxmert': [...], 'image_root': ...}} or "
                      "{'jsonl': ..., 'image_root': ...}")


# ---------------------------------------------------------------- data


class _PairData:
    """torch Dataset: i -> (pixels, sentence); an unreadable image gives way to pair i + 95 (Maria)."""

    def __init__(self, pairs: list[Pair], transform):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        for _ in range(BAD_IMAGE_TRIES):
            pair = self.pairs[i]
            try:
                return self.transform(read_rgb(pair.image)), pair.sentence
            except imgs.BadImage as e:
                log.warning("%s: %s; using pair %d instead", pair.image, e, (i + BAD_IMAGE_STEP) % len(self))
                i = (i + BAD_IMAGE_STEP) % len(self)
        raise VlprepError(f"{BAD_IMAGE_TRIES} unreadable images in a row from {self.pairs[i].image}; check image_root")


class _Collate:
    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items):
        ids, mask = encode_captions(self.tokenizer, [s for _, s in items], self.max_len)
        return ids, mask, torch.stack([px for px, _ in items])


def _loader(pairs, transform, collate, *, batch_size: int, sampler=None, num_workers: int, pin: bool):
    from torch.utils.data import DataLoader

    return DataLoader(_PairData(pairs, transform), batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin, drop_last=True,
                      worker_init_fn=storage.reset_after_fork if num_workers else None)


# ---------------------------------------------------------------- processes


@dataclass
class _Processes:
    rank: int
    world: int
    device: torch.device

    @classmethod
    def from_env(cls) -> _Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(rank, world, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63)


# ---------------------------------------------------------------- checkpoints


def _save(uri: str, obj) -> None:
    with storage.local_file_for(uri) as path:
        torch.save(obj, path)


def read_checkpoint(out: str) -> dict | None:
    """The last epoch checkpoint under ``out``, or None."""
    uri = storage.join(out, CHECKPOINT)
    if not storage.exists(uri):
        return None
    with storage.local_copy(uri) as path:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file gets one message
            raise VlprepError(f"{uri}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to start over") from None


def _resume(job: TrainJob, model: Matcher, optimizer) -> dict:
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": None, "history": []}
    ckpt = read_checkpoint(job.out)
    if ckpt is None:
        return state
    if ckpt.get("fingerprint") != job.fingerprint():
        raise VlprepError(f"{storage.join(job.out, CHECKPOINT)} belongs to a different training job (data, "
                          "weights, config or settings differ); use another output folder or delete it")
    missing, unexpected = model.load_state_dict(ckpt["heads"], strict=False)
    if unexpected or any(".mlp." in k for k in missing):
        raise VlprepError(f"{storage.join(job.out, CHECKPOINT)}: head weights do not fit the model; delete it")
    optimizer.load_state_dict(ckpt["optimizer"])
    return {k: ckpt[k] for k in state}


# ---------------------------------------------------------------- loop


def validate(model: Matcher, loader, margin: float, device: torch.device) -> dict:
    """Mean per-batch loss and recalls over the validation loader (eval mode)."""
    was_training = model.training
    model.eval()
    sums, batches = {"loss": 0.0, "R1": 0.0, "R5": 0.0, "R10": 0.0}, 0
    with torch.no_grad():
        for ids, mask, pixels in loader:
            lang, visn = model(ids.to(device), mask.to(device), pixels.to(device))
            sums["loss"] += float(sent_paired_hinge_rank_loss(lang, visn, margin))
            for k, v in sent_batchwise_recall(lang, visn).items():
                sums[f"R{k}"] += v
            batches += 1
    model.train(was_training)
    return {k: v / batches for k, v in sums.items()}


def _train_epoch(net, model: Matcher, loader, optimizer, settings: TrainSettings, device) -> float:
    trainable = [p for p in model.parameters() if p.requires_grad]
    net.train()
    total, steps = 0.0, 0
    bar = Progress("matcher training epoch", total=len(loader), unit="batches")
    for ids, mask, pixels in loader:
        lang, visn = net(ids.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                         pixels.to(device, non_blocking=True))
        loss = sent_paired_hinge_rank_loss(lang, visn, settings.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        total += value
        steps += 1
        if steps % 100 == 1:
            log.info("step %d: loss %.4f", steps, value)
        bar.advance()
    bar.close()
    return total / steps


def _check_sizes(s: TrainSettings, world: int, n_train: int, n_valid: int) -> int:
    per = s.batch_size // world
    if per < 2 or per % 2 or s.valid_batch_size % 2:
        raise VlprepError(f"batch_size {s.batch_size} over {world} processes gives {per} per process and "
                          f"valid_batch_size is {s.valid_batch_size}: both must be even (the loss pairs halves)")
    if n_train < s.batch_size or n_valid < s.valid_batch_size:
        raise VlprepError(f"{n_train} training / {n_valid} validation pairs are fewer than one batch "
                          f"({s.batch_size} / {s.valid_batch_size}); lower the batch sizes")
    return per


def run(job: TrainJob) -> dict:
    """Train (or resume) ``job``; returns a summary (rank 0's view)."""
    s = job.settings
    procs = _Processes.from_env()
    try:
        return _run(job, s, procs)
    finally:
        procs.close()


def _run(job: TrainJob, s: TrainSettings, procs: _Processes) -> dict:
    from torch.utils.data.distributed import DistributedSampler

    config = cfg.get_config(job.config)
    tokenizer = load_tokenizer(job.tokenizer)
    train_pairs, valid_pairs = load_pairs(job.train), load_pairs(job.valid)
    random.Random(VALID_SHUFFLE_SEED).shuffle(valid_pairs)
    per_process = _check_sizes(s, procs.world, len(train_pairs), len(valid_pairs))
    model = build_matcher(config, bert_weights=job.bert_weights, resnet_weights=job.resnet_weights,
                          head_seed=s.seed).to(procs.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=s.lr)
    state = _resume(job, model, optimizer)
    net = model
    if procs.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None, broadcast_buffers=False)
    collate, pin = _Collate(tokenizer, s.max_len), procs.device.type == "cuda"
    sampler = DistributedSampler(train_pairs, num_replicas=procs.world, rank=procs.rank, shuffle=True, seed=s.seed)
    train_loader = _loader(train_pairs, train_transform(config), collate, batch_size=per_process, sampler=sampler,
                           num_workers=s.num_workers, pin=pin)
    valid_loader = _loader(valid_pairs, eval_transform(config), collate, batch_size=s.valid_batch_size,
                           num_workers=s.num_workers, pin=pin)
    for epoch in range(state["epoch"], s.epochs):
        t0 = time.time()
        sampler.set_epoch(epoch if s.reshuffle_each_epoch else 0)
        torch.manual_seed(epoch_seed(s.seed, epoch, procs.rank))
        train_loss = _train_epoch(net, model, train_loader, optimizer, s, procs.device)
        procs.barrier()
        if procs.main:
            metrics = validate(model, valid_loader, s.margin, procs.device)
            record = {"epoch": epoch + 1, "train_loss": train_loss, **{f"valid_{k}": v for k, v in metrics.items()},
                      "seconds": round(time.time() - t0, 3)}
            state["history"].append(record)
            if metrics["loss"] < state["best_loss"]:
                state["best_loss"], state["best_epoch"] = metrics["loss"], epoch + 1
                _save(storage.join(job.out, BEST), maria_state_dict(model))
                storage.write_text(storage.join(job.out, BEST_INFO), json.dumps(record, indent=1))
            state["epoch"] = epoch + 1
            _save(storage.join(job.out, CHECKPOINT), {**state, "heads": model.head_state(),
                                                      "optimizer": optimizer.state_dict(),
                                                      "fingerprint": job.fingerprint()})
            storage.write_text(storage.join(job.out, METRICS), json.dumps(state["history"], indent=1))
            log.info("epoch %d: %s", epoch + 1, record)
        procs.barrier()
    return {"epochs": s.epochs, "best_epoch": state["best_epoch"], "best_loss": state["best_loss"],
            "history": state["history"], "out": job.out, "processes": procs.world}


def main(argv: list[str] | None = None) -> None:
    """``python -m vlprep.models.matching.train JOB.json`` (under torchrun for several GPUs)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: [torchrun --nproc_per_node=N] python -m vlprep.models.matching.train JOB.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(TrainJob.from_dict(json.loads(storage.read_text(args[0]))))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
