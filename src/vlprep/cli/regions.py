"""``vlprep regions extract | lmdb | hard-negatives``: bottom-up-attention region features (VOLTA / LXMERT)."""

from __future__ import annotations

from vlprep import VlprepError, storage
from vlprep.cli import options


def add(sub) -> None:
    s = sub.add_parser("regions", help="bottom-up-attention region features (VOLTA / LXMERT)")
    s.add_argument("action", choices=["extract", "lmdb", "hard-negatives"],
                   help="extract: the whole stage (plan, detect, merge, LMDB, hard negatives with --annotations); "
                        "lmdb / hard-negatives: redo those from an extracted --out")
    s.add_argument("--out", required=True, help="output directory or gs:// prefix")
    s.add_argument("--images", help="image folder / gs:// prefix, list file (.txt) or Karpathy file (.json)")
    s.add_argument("--image-root", default="", help="with a Karpathy file: the folder holding filepath/filename")
    s.add_argument("--dataset", default="coco", choices=["coco", "flickr30k"])
    s.add_argument("--recipe", default="caffe36",
                   help="caffe10-100 | caffe36 | d2-nb36 | d2-maxnms36 | d2-maxnms36-volta | given-boxes")
    s.add_argument("--recipe-params", type=options.json_object, default={}, help='JSON overrides, e.g. \'{"nms_start": 0.5}\'')
    s.add_argument("--weights", default="default", help="default (the published BUTD weights, cached; random:0, "
                   "flagged, when offline), URL, gs://, local path or random:<seed>")
    s.add_argument("--format", default="volta-tsv,lxmert-tsv", help="comma list of volta-tsv, lxmert-tsv, h5")
    s.add_argument("--arch", default="full", choices=["full", "tiny"], help="tiny: a small test configuration")
    s.add_argument("--autocast", default="", help="a torch dtype (e.g. float16) to run the detector under autocast")
    s.add_argument("--no-lmdb", dest="lmdb", action="store_false", help="skip the LMDB build")
    s.add_argument("--annotations", default="", help="caption annotations folder (train_ann.jsonl) for hard_negative.pkl")
    s.add_argument("--vocab-objects", default="", help="VG object vocabulary for the report's labels")
    s.add_argument("--vocab-attributes", default="", help="VG attribute vocabulary for the report's labels")
    options.fan_out(s)
    options.split(s)
    options.runtime(s, device="cpu")
    options.devices(s)
    s.set_defaults(func=cmd)


def cmd(args) -> int:
    from vlprep import stage
    from vlprep.stages import regions

    if args.action == "lmdb":
        summary = regions.lmdb(args.out)
    elif args.action == "hard-negatives":
        summary = regions.hard_negatives(args.out, args.annotations)
    else:
        if not args.images:
            raise VlprepError("regions extract: give --images (a folder, list file or Karpathy file)")
        settings = regions.Settings(
            images=args.images, image_root=args.image_root, dataset=args.dataset, recipe=args.recipe,
            recipe_params=args.recipe_params, weights=args.weights, arch=args.arch, autocast=args.autocast,
            formats=args.format, lmdb=args.lmdb, annotations=args.annotations, vocab_objects=args.vocab_objects,
            vocab_attributes=args.vocab_attributes)
        with options.use_devices(args, "shards"):
            runtime = stage.Runtime(device=args.device, batch_size=args.batch_size, num_workers=args.workers)
            runtime.resolved_device()  # a missing GPU stops here, before anything is planned
            summary = regions.run(args.out, settings, num_shards=args.shards, split=args.split, runtime=runtime)
        print(f"report: {storage.join(args.out, regions.REPORT)}")
    options.print_json(summary)
    return 0
