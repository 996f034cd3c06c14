"""``vlprep context phrases | run`` (alias ``vlprep ctx``): cross-modal context (Xmodal-Ctx / HAAV)."""

from __future__ import annotations

from vlprep.cli import options


def add(sub) -> None:
    ctx = sub.add_parser("context", aliases=["ctx"],
                         help="cross-modal context (Xmodal-Ctx / HAAV): VG phrases, CLIP, faiss")
    actions = ctx.add_subparsers(dest="context_command", required=True)

    s = actions.add_parser("phrases", help="the Visual Genome phrase list (caption DB rows), one per line")
    s.add_argument("--attributes", required=True, help="VG attributes.json (path or gs://)")
    s.add_argument("--relationships", required=True, help="VG relationships.json (path or gs://)")
    s.add_argument("--out", required=True, help="output file or gs:// URI")
    s.add_argument("--no-attribute-leak", action="store_true",
                   help="do not reproduce upstream's shared attribute sets (see vlprep.data.visual_genome)")
    s.set_defaults(func=cmd_phrases)

    s = actions.add_parser("run", help="vis_ctx.hdf5, caption_db.hdf5, faiss.index and txt_ctx.hdf5 in one process")
    s.add_argument("--images", required=True, help="image folder, list file (.txt) or Karpathy split file (.json)")
    s.add_argument("--image-root", default="", help="with a Karpathy file: the folder its filepaths are under")
    s.add_argument("--attributes", required=True)
    s.add_argument("--relationships", required=True)
    s.add_argument("--out", required=True, help="output directory or gs:// prefix")
    s.add_argument("--recipe", default="xmodal-ctx", choices=["xmodal-ctx", "haav"])
    s.add_argument("--weights", default="default",
                   help="CLIP weights: default (the openai tag's file, cached; random:0, flagged, when offline), "
                   "open_clip tag, checkpoint file/URL, or random:SEED")
    s.add_argument("--text-weights", default="", help="haav: weights of the ViT-L-14 text model (default --weights)")
    s.add_argument("--model-cfg", default="", help="'tiny' or an open_clip model config JSON (tests)")
    s.add_argument("--index", default="ivf", choices=["ivf", "flat"], help="ivf (upstream) or flat (exact, small corpora)")
    s.add_argument("--topk", default="", help="whole,five,nine (default: the recipe's)")
    s.add_argument("--image-batch", type=options.non_negative_int, default=0, help="images per block (default: the recipe's 32)")
    s.add_argument("--text-batch", type=options.non_negative_int, default=0, help="phrases per block (default 512)")
    s.add_argument("--encode-batch", type=options.positive_int, default=256, help="views or phrases per forward pass")
    s.add_argument("--no-attribute-leak", action="store_true")
    options.fan_out(s, "--image-shards", "image shards")
    options.fan_out(s, "--phrase-shards", "phrase shards")
    options.split(s)
    options.runtime(s, device="auto", batch_size=None)
    options.devices(s)
    s.set_defaults(func=cmd_run)


def cmd_phrases(args) -> int:
    from vlprep.stages import context

    options.print_json(context.phrases(args.attributes, args.relationships, args.out,
                                       attribute_leak=not args.no_attribute_leak))
    return 0


def cmd_run(args) -> int:
    from vlprep import stage
    from vlprep.stages import context

    settings = context.make_settings(
        images=args.images, image_root=args.image_root, attributes=args.attributes, relationships=args.relationships,
        recipe=args.recipe, weights=args.weights, text_weights=args.text_weights, model_cfg=args.model_cfg,
        index=args.index, topk=args.topk, image_batch=args.image_batch, text_batch=args.text_batch,
        encode_batch=args.encode_batch, attribute_leak=not args.no_attribute_leak)
    with options.use_devices(args, "image_shards", "phrase_shards"):
        runtime = stage.Runtime(device=args.device, num_workers=args.workers)
        runtime.resolved_device()  # a missing GPU stops here, before anything is planned
        summary = context.run(args.out, settings, image_shards=args.image_shards, phrase_shards=args.phrase_shards,
                              split=args.split, runtime=runtime)
    options.print_json(summary)
    return 0
