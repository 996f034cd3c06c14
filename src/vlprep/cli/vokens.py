"""``vlprep vokens train | tokenize | keys | vokenize``: Maria's vokenization, one step per command.

Each command runs its step's plan, shards (done ones skipped) and merge in this process, as the ``vokens``
pipeline's components do, into its own ``--out`` folder (Maria's: a tokens folder, ``{load}/keys``,
``{load}/vokens``).
"""

from __future__ import annotations

from dataclasses import fields

from vlprep.cli import options


def add(sub) -> None:
    vk = sub.add_parser("vokens", help="Maria's vokenization: matcher training, tokens, image keys, top-5 vokens")
    actions = vk.add_subparsers(dest="vokens_command", required=True)

    s = actions.add_parser("tokenize", help="a line corpus -> {corpus}.{tokenizer} + .line + .hdf5")
    s.add_argument("--corpus", required=True, help="the corpus file (one dialog per line, utterances tab-separated)")
    s.add_argument("--tokenizer", required=True, help="HF name, tokenizer folder or vocab.txt")
    s.add_argument("--out", required=True, help="tokens folder or gs:// prefix")
    s.add_argument("--drop-empty", action="store_true", help="drop lines without tokens (upstream's files)")
    s.add_argument("--retrieval-input", default="", choices=["", "whole", "context"],
                   help="default: by file name (valid/test: the context only, as Maria)")
    s.add_argument("--block-lines", type=options.positive_int, default=1 << 16, help="lines per plan item (shards are whole items)")
    options.fan_out(s)
    options.split(s)
    options.devices(s)
    s.set_defaults(func=cmd_tokenize)

    s = actions.add_parser("keys", help="an image set -> {set}.hdf5 + .path + .ids")
    s.add_argument("--images", required=True, help="image folder, ids file (.ids) or LXMERT JSON (.json)")
    s.add_argument("--set", dest="image_set", required=True, help="the image set's name (e.g. open_images, coco_train)")
    s.add_argument("--matcher", required=True, help="BEST.pth (path, gs://, URL) or random:SEED")
    s.add_argument("--out", required=True, help="keys folder or gs:// prefix")
    s.add_argument("--image-root", default="", help="with an ids file or LXMERT JSON: the folder of its images")
    _config(s)
    s.add_argument("--batch-size", type=options.positive_int, default=512, help="images per forward pass (upstream's 512)")
    options.fan_out(s)
    options.split(s)
    options.runtime(s, device="auto", batch_size=None)
    options.devices(s)
    s.set_defaults(func=cmd_keys)

    s = actions.add_parser("vokenize", help="tokens + keys -> Maria's top-k image file and its .ids")
    s.add_argument("--tokens", required=True, help="tokens prefix, or a tokens folder holding one corpus")
    s.add_argument("--matcher", required=True, help="the BEST.pth the keys were extracted with (or random:SEED)")
    s.add_argument("--keys", required=True, help="keys folder")
    s.add_argument("--out", required=True, help="vokens folder or gs:// prefix")
    s.add_argument("--topk", type=options.positive_int, default=5)
    s.add_argument("--sets", default="", help="comma list of image sets (default: every set in --keys)")
    s.add_argument("--max-images", type=int, default=-1, help="use the first N key rows (-1: all)")
    s.add_argument("--tokenizer", default="", help="default: the one the corpus was tokenized with")
    s.add_argument("--page-lines", type=options.positive_int, default=512, help="entries per batch (Maria's page)")
    _config(s)
    options.fan_out(s)
    options.split(s)
    s.add_argument("--device", type=options.device_name, default="auto", help="auto, cpu or cuda (faiss-gpu when present)")
    options.devices(s)
    s.set_defaults(func=cmd_vokenize)

    s = actions.add_parser("train", help="train the matcher (Maria's recipe; torchrun over the GPUs; resumable)")
    s.add_argument("--train", required=True, help="LXMERT JSON(s), comma-separated, or a caption .jsonl")
    s.add_argument("--valid", required=True, help="validation captions, the same kinds")
    s.add_argument("--image-root", required=True, help="COCO images (train2014/, val2014/ inside)")
    s.add_argument("--out", required=True, help="output folder: checkpoint.pth, BEST.pth, BEST.json, metrics.json")
    _config(s)
    s.add_argument("--tokenizer", default="bert-base-uncased")
    s.add_argument("--bert-weights", default="bert-base-uncased")
    s.add_argument("--resnet-weights", default="https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth")
    s.add_argument("--nproc", type=options.positive_int, default=None, help="processes (default: one per visible GPU)")
    _train_settings(s)
    s.set_defaults(func=cmd_train)


def _config(p) -> None:
    p.add_argument("--config", default="maria", choices=["maria", "tiny"], help="matcher architecture")


def _train_settings(p) -> None:
    """One option per ``TrainSettings`` field, with its default."""
    from vlprep.models.matching.config import TrainSettings

    for f in fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=f"TrainSettings.{f.name}")
        else:
            kind = {"int": options.non_negative_int, "float": options.non_negative_float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")


def cmd_tokenize(args) -> int:
    from vlprep.stages import vokens

    settings = vokens.TokenizeSettings(corpus=args.corpus, tokenizer=args.tokenizer, retrieval_input=args.retrieval_input,
                                       drop_empty=args.drop_empty, block_lines=args.block_lines)
    with options.use_devices(args, "shards"):
        options.print_json(vokens.run_steps("vokens_tokenize", vokens.tokenize_steps(
            args.out, settings, num_shards=args.shards, split=args.split)))
    return 0


def cmd_keys(args) -> int:
    from vlprep import stage
    from vlprep.stages import vokens

    settings = vokens.KeySettings(images=args.images, image_set=args.image_set, matcher=args.matcher, config=args.config,
                                  image_root=args.image_root, batch_size=args.batch_size)
    with options.use_devices(args, "shards"):
        runtime = stage.Runtime(device=args.device, num_workers=args.workers)
        runtime.resolved_device()  # a missing GPU stops here, before anything is planned
        options.print_json(vokens.run_steps("vokens_keys", vokens.keys_steps(
            args.out, settings, num_shards=args.shards, split=args.split, runtime=runtime)))
    return 0


def cmd_vokenize(args) -> int:
    from vlprep import stage
    from vlprep.stages import vokens

    settings = vokens.make_settings(tokens=args.tokens, keys=args.keys, matcher=args.matcher, config=args.config,
                                    image_sets=args.sets, topk=args.topk, max_images=args.max_images,
                                    tokenizer=args.tokenizer, page_lines=args.page_lines)
    with options.use_devices(args, "shards"):
        summary = vokens.run_steps("vokens", vokens.vokenize_steps(
            args.out, lambda: settings, num_shards=args.shards, split=args.split,
            runtime=stage.Runtime(device=args.device)))
    print(f"report: {summary['report']}")
    options.print_json(summary)
    return 0


def cmd_train(args) -> int:
    from vlprep.models.matching.config import TrainSettings
    from vlprep.stages import vokens

    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    job = vokens.train_job(args.out, train=args.train, valid=args.valid, image_root=args.image_root, config=args.config,
                           tokenizer=args.tokenizer, bert_weights=args.bert_weights, resnet_weights=args.resnet_weights,
                           settings=settings)
    options.print_json(vokens.train(job, args.nproc))
    return 0
