"""``vlprep captions``: VOLTA caption annotations (jsonl) from a Karpathy split file."""

from __future__ import annotations

from vlprep.cli import options


def add(sub) -> None:
    s = sub.add_parser("captions", help="VOLTA caption annotations (jsonl) from a Karpathy split file")
    s.add_argument("--karpathy", required=True, help="dataset_coco.json / dataset_flickr30k.json (path or gs://)")
    s.add_argument("--dataset", required=True, choices=["coco", "flickr30k"])
    s.add_argument("--out", required=True, help="output directory or gs:// prefix")
    s.add_argument("--test1k-ids", default="", help="COCO: file of image ids for test1k_ann.jsonl")
    options.fan_out(s)
    options.split(s)
    s.set_defaults(func=cmd)


def cmd(args) -> int:
    from vlprep.stages import captions

    settings = captions.Settings(karpathy=args.karpathy, dataset=args.dataset, test1k_ids=args.test1k_ids)
    options.print_json(captions.run(args.out, settings, num_shards=args.shards, split=args.split))
    return 0
