"""Cross-modal context stage vs bare loops, measured in the same run on the same inputs.

1. Image encoding (whole image + 5 + 9 crops per image, the stage's real work), images/s:
   - ``bare open_clip``: a plain torch DataLoader (same worker count) that opens each file with PIL, cuts
     torchvision ``five_crop`` (float size, as upstream) and the 3x3 grid, applies open_clip's eval
     transform to each view, and ``model.encode_image`` (normalized) on the whole images and the crops;
   - ``vlprep``: :func:`vlprep.stages.context.encode_images` over the same files (robust decoding,
     parts written to the store, done-markers), the model already loaded.
   Ratio = vlprep / bare (higher is better; target >= 0.9).
2. Retrieval, queries/s (15 queries per image, ``--retrieval-images`` images, 512-d vectors from a model
   with tiny towers: only their number and width matter): ``bare faiss``: the same saved index and the
   same query vectors, one ``index.search`` per view over all queries at once; second baseline: the same
   per block of 32 images, as upstream batches and as the stage does (per-block searches keep results
   independent of shard boundaries); ``vlprep``: the retrieval plan and :func:`retrieve` (loads index and
   queries from the store, one search per view per block, writes parts and done-markers).

Weights are random (throughput does not depend on them). ``--model b32`` is the real ViT-B/32 vision
tower with a 2-layer text tower (phrases are many and only their count matters here); ``tiny`` is the
test model. Usage: python bench/bench_context.py [--images 24] [--phrases 20000] [--retrieval-images 320] [--model b32|tiny]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlprep import index as faiss_index
from vlprep import shards, stage
from vlprep.sample import sample_dir
from vlprep.stages import context as C

MODELS = {
    "b32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 2},
    },
    "tiny": C.TINY_CFG,
}
RETRIEVAL_CFG = {**C.TINY_CFG, "embed_dim": 512}  # 512-d keys and queries (XC's), tiny towers


def make_images(folder: Path, n: int) -> None:
    """``n`` files cycling over the sample photos, with COCO names (ids 1..n)."""
    photos = sorted(Path(sample_dir(), "images").rglob("*.jpg"))
    (folder / "val2014").mkdir(parents=True)
    for i in range(n):
        shutil.copy(photos[i % len(photos)], folder / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg")


def make_vg(folder: Path, n_phrases: int) -> tuple[str, str]:
    """Synthetic VG files giving ``n_phrases`` attribute phrases ("a{j} h{i}")."""
    per = 100
    heads = -(-n_phrases // per)
    attrs = [{"image_id": i, "attributes": [{"synsets": [f"h{i}.n.01"], "attributes": [f"a{j}" for j in range(per)]}]}
             for i in range(heads)]
    (folder / "attributes.json").write_text(json.dumps(attrs))
    (folder / "relationships.json").write_text(json.dumps([{"image_id": 0, "relationships": []}]))
    return str(folder / "attributes.json"), str(folder / "relationships.json")


class BareViews(torch.utils.data.Dataset):
    """The baseline's dataset: PIL open, 15 views, open_clip's transform."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from torchvision.transforms import functional as F

        im = Image.open(self.paths[i]).convert("RGB")
        w, h = im.size
        views = [im, *F.five_crop(im, (h * 0.6, w * 0.6))]
        rows = [(0, int(0.4 * h)), (int(0.3 * h), int(0.7 * h)), (int(0.6 * h), h)]
        cols = [(0, int(0.4 * w)), (int(0.3 * w), int(0.7 * w)), (int(0.6 * w), w)]
        views += [im.crop((x0, y0, x1, y1)) for y0, y1 in rows for x0, x1 in cols]
        return torch.stack([self.transform(v) for v in views])


def bare_encode(model, transform, paths, batch: int, workers: int, device: str) -> float:
    loader = torch.utils.data.DataLoader(BareViews(paths, transform), batch_size=batch, num_workers=workers)
    t = time.perf_counter()
    with torch.inference_mode():
        for px in loader:
            px = px.to(device)
            m = px.shape[0]
            model.encode_image(px[:, 0], normalize=True)
            model.encode_image(px[:, 1:].reshape(m * 14, *px.shape[2:]), normalize=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--phrases", type=int, default=20000)
    ap.add_argument("--retrieval-images", type=int, default=320)
    ap.add_argument("--model", choices=sorted(MODELS), default="b32")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--index", choices=["ivf", "flat"], default="ivf")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    runtime = stage.Runtime(device=args.device, num_workers=args.num_workers)
    device = runtime.resolved_device()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.images)
        attrs, rels = make_vg(tmp, args.phrases)
        out = str(tmp / "out")
        settings = C.make_settings(images=str(tmp / "images"), attributes=attrs, relationships=rels, weights="random:0",
                                   model_cfg=MODELS[args.model], index=args.index)
        C.plan(out, settings)
        enc = C.encoder_for(settings, device)  # load once; both loops use this model
        model = enc.model("image")
        import open_clip

        transform = open_clip.image_transform(224, is_train=False)
        paths = sorted(str(x) for x in (tmp / "images").rglob("*.jpg"))
        print(f"device {device}, {torch.get_num_threads()} torch threads, {args.num_workers} loader workers, "
              f"model {args.model}, {args.images} images x 15 views, weights random")

        # warm-up: a few images through each path
        bare_encode(model, transform, paths[:2], 2, 0, device)
        best_bare, best_ours = float("inf"), float("inf")
        for _ in range(args.repeats):
            best_bare = min(best_bare, bare_encode(model, transform, paths, settings.image_batch, args.num_workers, device))
            shutil.rmtree(Path(out, "_work/context/images"), ignore_errors=True)
            specs = C.plan_images(out)
            t = time.perf_counter()
            for spec in specs:
                marker = C.encode_images(spec, runtime)
            best_ours = min(best_ours, time.perf_counter() - t)
            assert marker["images"] == args.images and not marker["skipped"]
        bare_ips, ours_ips = args.images / best_bare, args.images / best_ours
        print(f"image encode  bare open_clip loop (baseline) {bare_ips:8.2f} images/s")
        print(f"image encode  vlprep encode_images           {ours_ips:8.2f} images/s   "
              f"ratio vlprep/bare {ours_ips / bare_ips:5.2f} (target >= 0.9)")

        # retrieval: many queries, cheaply: a 512-d model with tiny towers (only the vectors' count and width matter)
        out = str(tmp / "retrieval")
        make_images(tmp / "many", args.retrieval_images)
        settings = C.make_settings(images=str(tmp / "many"), attributes=attrs, relationships=rels, weights="random:0",
                                   model_cfg=RETRIEVAL_CFG, index=args.index)
        for spec in C.plan(out, settings):
            C.encode_phrases(spec, runtime)
        t = time.perf_counter()
        meta = C.build_index(out)
        print(f"index {meta['factory']} over {meta['n']} phrases x {meta['dim']}, nprobe {meta['nprobe']}, "
              f"built in {time.perf_counter() - t:.1f} s")
        for spec in C.plan_images(out):
            C.encode_images(spec, runtime)
        index = faiss_index.load(str(Path(out, C.FAISS_INDEX)), meta["nprobe"])
        shard = shards.load(spec)
        queries = np.load(io.BytesIO(Path(shard.part("queries.npy")).read_bytes()))
        nq = queries.shape[0] * queries.shape[1]
        views = tuple(zip((slice(0, 1), slice(1, 6), slice(6, 15)), settings.topk, strict=True))
        best_bare, best_block, best_ours = float("inf"), float("inf"), float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            for sl, k in views:
                index.search(np.ascontiguousarray(queries[:, sl].reshape(-1, queries.shape[2])), k)
            best_bare = min(best_bare, time.perf_counter() - t)
            t = time.perf_counter()
            for b in range(0, len(queries), settings.image_batch):
                for sl, k in views:
                    index.search(np.ascontiguousarray(queries[b:b + settings.image_batch, sl].reshape(-1, queries.shape[2])), k)
            best_block = min(best_block, time.perf_counter() - t)
            shutil.rmtree(Path(out, "_work/context/retrieve"), ignore_errors=True)
            t = time.perf_counter()
            for spec in C.plan_retrieval(out):
                C.retrieve(spec, runtime)
            best_ours = min(best_ours, time.perf_counter() - t)
        print(f"retrieval ({args.retrieval_images} images x 15 queries, top-k {list(settings.topk)})")
        print(f"retrieval     bare faiss search, all queries at once (baseline)   {nq / best_bare:8.0f} queries/s")
        print(f"retrieval     bare faiss search, per block of {settings.image_batch} images (upstream's) "
              f"{nq / best_block:8.0f} queries/s")
        print(f"retrieval     vlprep retrieve (per block)                        {nq / best_ours:8.0f} queries/s   "
              f"ratio vlprep/bare {best_bare / best_ours:5.2f}, vlprep/bare-per-block {best_block / best_ours:5.2f}")


if __name__ == "__main__":
    main()
