"""``vlprep xlxmert extract | kmeans``: X-LXMERT grid / box features and the visual vocabulary."""

from __future__ import annotations

from vlprep import VlprepError, storage
from vlprep.cli import options


def add(sub) -> None:
    s = sub.add_parser("xlxmert", help="X-LXMERT grid8 / boxes36 features and the k-means visual vocabulary")
    actions = s.add_subparsers(dest="action", required=True)
    _add_extract(actions.add_parser(
        "extract", help="images -> X-152 detector -> maskrcnn_{split}_{kind}.h5 (+ xlxmert_<kind>_report.html)"))
    _add_kmeans(actions.add_parser(
        "kmeans", help="k-means on a source's grid cells, then every target's cluster ids under OUT/clustering/"))


def _add_extract(s) -> None:
    s.add_argument("--images", required=True, help="image folder / gs:// prefix, list file (.txt) or Karpathy file")
    s.add_argument("--image-root", default="", help="with a Karpathy file: the folder holding filepath/filename")
    s.add_argument("--kind", default="grid8", choices=["grid8", "boxes36"])
    s.add_argument("--weights", default="default",
                   help="detectron_model.pth spec: default (the published file, cached; random:0, flagged, when "
                   "offline), URL, gs://, local path, or random:<seed>")
    s.add_argument("--config", default="", help="detectron_config.yaml spec (default: the published model's values)")
    s.add_argument("--out", required=True, help="the datasets folder or gs:// prefix (COCO/features/... go under it)")
    s.add_argument("--dataset", default="coco", choices=["coco", "vg", "gqa", "nlvr2"],
                   help="names the files: coco and nlvr2 by split folder, vg and gqa one file")
    s.add_argument("--imsize", type=options.non_negative_int, default=0, help="grid8: resize to NxN (a multiple of 32); files get _imsize{N}")
    s.add_argument("--arch", default="full", choices=["full", "tiny"], help="tiny: a small test configuration")
    s.add_argument("--autocast", default="", help="a torch dtype (e.g. float16) to run the detector under autocast")
    options.fan_out(s)
    options.split(s)
    options.runtime(s, device="auto")
    options.devices(s)
    s.set_defaults(func=cmd_extract)


def _add_kmeans(s) -> None:
    s.add_argument("--features", action="append", default=[], metavar="NAME=H5",
                   help="a grid HDF5 to assign (repeat); upstream names (mscoco_train, mscoco_valid, nlvr_train, "
                        "nlvr_valid, vg) alone resolve under --out; none: every grid8 file extracted under --out")
    s.add_argument("--src", default="", help="the feature set k-means trains on (default: the first --features)")
    s.add_argument("--n-centroids", dest="k", type=options.positive_int, default=10000)
    s.add_argument("--n-iter", dest="niter", type=options.positive_int, default=20)
    s.add_argument("--dim", type=options.non_negative_int, default=2048, help="feature width (0: the source's)")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--max-points-per-centroid", type=options.positive_int, default=256)
    s.add_argument("--nredo", type=options.positive_int, default=1)
    s.add_argument("--imsize", type=options.non_negative_int, default=0, help="features of NxN images: names the files _imsize{N}")
    s.add_argument("--images", default="", help="the images, for the report's cell crops (default: the extraction's)")
    s.add_argument("--out", required=True, help="the datasets folder or gs:// prefix; files go under OUT/clustering/")
    options.fan_out(s, what="assignment shards")
    options.split(s)
    s.add_argument("--device", type=options.device_name, default="auto", help="auto (faiss on the GPU when it sees one) or cpu")
    s.set_defaults(func=cmd_kmeans)


def cmd_extract(args) -> int:
    from vlprep import stage
    from vlprep.stages import xlxmert

    settings = xlxmert.Settings(images=args.images, image_root=args.image_root, kind=args.kind, dataset=args.dataset,
                                weights=args.weights, config=args.config, arch=args.arch, autocast=args.autocast,
                                imsize=args.imsize)
    with options.use_devices(args, "shards"):
        runtime = stage.Runtime(device=args.device, batch_size=args.batch_size, num_workers=args.workers)
        runtime.resolved_device()  # a missing GPU stops here, before anything is planned
        summary = xlxmert.run(args.out, settings, num_shards=args.shards, split=args.split, runtime=runtime)
    print(f"report: {storage.join(args.out, xlxmert.features_report(args.kind))}")
    options.print_json(summary)
    return 0


def cmd_kmeans(args) -> int:
    from vlprep import stage
    from vlprep.stages import xlxmert

    if args.src and args.features and not any(f.partition("=")[0] == args.src for f in args.features):
        raise VlprepError(f"--src {args.src}: not among --features ({', '.join(args.features)})")
    vocab = xlxmert.VocabSettings(features=tuple(args.features), src=args.src, k=args.k, niter=args.niter,
                                  dim=args.dim, seed=args.seed, max_points_per_centroid=args.max_points_per_centroid,
                                  nredo=args.nredo, imsize=args.imsize, images=args.images)
    summary = xlxmert.run_vocabulary(args.out, vocab, num_shards=args.shards, split=args.split,
                                     runtime=stage.Runtime(device=args.device))
    print(f"report: {summary['report']}")
    options.print_json(summary)
    return 0
