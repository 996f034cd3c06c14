"""Training the matcher as one step (one pod, all its GPUs), or taking a given one.

:func:`train` runs ``vlprep.models.matching.train`` (Maria's recipe; the library does the loop): under
``torchrun --nproc_per_node=N`` when the pod has N > 1 GPUs (DDP, one process per GPU), in this process
otherwise. Its output folder holds ``checkpoint.pth`` (after every epoch), ``BEST.pth`` (Maria's state
dict, lowest validation loss), ``BEST.json`` and ``metrics.json``; a rerun (a KFP retry after a kill)
resumes after the last completed epoch and refuses a checkpoint of another job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from vlprep import VlprepError, storage
from vlprep.models import weights as wts
from vlprep.models.matching import train as tr
from vlprep.stages.vokens.settings import check_config


def data_source(captions: str, image_root: str) -> dict:
    """Training data: a caption ``.jsonl`` (vlprep / VOLTA) or LXMERT JSONs (comma-separated), and the image root."""
    if not captions or not image_root:
        raise VlprepError("training data: give the captions (LXMERT JSON(s) or a caption .jsonl) and their image_root")
    if captions.endswith(".jsonl"):
        return {"jsonl": captions, "image_root": image_root}
    return {"lxmert": [c.strip() for c in captions.split(",") if c.strip()], "image_root": image_root}


def train_job(out: str, *, train: str, valid: str, image_root: str, config: str = "maria",
              tokenizer: str = tr.cfg.BERT_BASE_UNCASED, bert_weights: str = tr.cfg.BERT_BASE_UNCASED,
              resnet_weights: str = tr.cfg.RESNEXT101_32X8D_IMAGENET, settings: tr.TrainSettings | None = None,
              ) -> tr.TrainJob:
    """A training job (``TrainJob``) from user values; ``valid`` images under the same ``image_root``."""
    return tr.TrainJob(out=str(out), train=data_source(train, image_root), valid=data_source(valid, image_root),
                       config=check_config(config), tokenizer=tokenizer, bert_weights=bert_weights,
                       resnet_weights=resnet_weights, settings=settings or tr.TrainSettings())


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train(job: tr.TrainJob, nproc: int | None = None) -> dict:
    """Train (or resume) ``job`` with ``nproc`` processes (default: one per visible GPU; plain when <= 1)."""
    n = gpu_count() if nproc is None else int(nproc)
    if n > 1:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "job.json")
            path.write_text(json.dumps(job.to_dict()))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   "-m", "vlprep.models.matching.train", str(path)]
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise VlprepError(f"training under torchrun ({n} processes) failed with exit code {res.returncode}; "
                              "its log is above. A rerun resumes from the last epoch's checkpoint.")
        summary = json.loads(res.stdout.strip().splitlines()[-1])
    else:
        summary = tr.run(job)
    return {"matcher": storage.join(job.out, tr.BEST), "out": job.out, "processes": max(n, 1),
            "epochs": summary["epochs"], "best_epoch": summary["best_epoch"], "best_loss": summary["best_loss"]}


def matcher(spec: str) -> str:
    """A given matcher spec, checked to name something (``random:<seed>``, a file, gs:// object or URL)."""
    spec = str(spec)
    if not spec:
        raise VlprepError("matcher: give a BEST.pth spec (path, gs://, URL) or random:<seed>, or train one")
    location, _ = wts.split_checksum(spec)
    remote = location.startswith(("http://", "https://"))  # fetched (and checked) where it is loaded
    if wts.parse_random_spec(spec) is None and not remote and not storage.exists(location):
        raise VlprepError(f"matcher {spec}: no such file; pass Maria's BEST.pth (or train one: leave matcher empty)")
    return spec
