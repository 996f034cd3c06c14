"""The embedded default: every workflow on the bundled sample data, run by ``make run``.

Its parameters are plain paths (KFP cannot concatenate strings into a nested pipeline's inputs);
``local_params`` fills them in for a local run from the sample directory and the run directory.
Weights are ``default``: each plan step downloads the published weights once (BUTD detector, OpenAI
CLIP ViT-B/32; cached, sha256 recorded) and pins them for every shard; offline it falls back to
``random:0``, with a WARNING in the log, a RANDOM banner in the stage's report and a Weights section in
the run's ``report.md``. Pass other specs with ``--param weights=...`` (``clip_weights``,
``xlxmert_weights``). X-LXMERT runs its tiny detector by default (``xlxmert_arch``): the full X-152 takes
about 40 s per image and kind on a CPU. The published X-152 weights do not fit the tiny detector, so
there ``default`` means ``random:0`` (flagged, with that reason); ``--param xlxmert_arch=full`` runs the
real architecture with the published weights. Maria's matcher has no published weights: a tiny random
one (``matcher``), or one trained here from random backbones.
"""

from kfp import dsl
from vlprep_pipelines.context import context as context_pipeline
from vlprep_pipelines.regions import regions
from vlprep_pipelines.vokens import vokens as vokens_pipeline
from vlprep_pipelines.xlxmert import xlxmert as xlxmert_pipeline


@dsl.pipeline(name="demo", description="All vlprep workflows on one small dataset")
def demo(  # every input path is a parameter: KFP cannot join strings for a nested pipeline's inputs
    karpathy: str, test1k_ids: str, images: str, mscoco: str, annotations: str, attributes: str, relationships: str,
    context: str, xlxmert: str, corpus: str, vokens_images: str, tokenizer: str, vokens: str,
    weights: str = "default", clip_weights: str = "default", num_shards: int = 2, arch: str = "full",
    device: str = "cpu", xlxmert_weights: str = "default", xlxmert_arch: str = "tiny", matcher: str = "random:0",
):
    regions(images=images, out=mscoco, karpathy=karpathy, annotations=annotations, dataset="coco", recipe="caffe36",
            weights=weights, num_shards=num_shards, device=device, batch_size=4, num_workers=2, arch=arch,
            test1k_ids=test1k_ids)
    # 141 sample phrases are too few for an IVF index: the exact one
    context_pipeline(images=images, attributes=attributes, relationships=relationships, out=context,
                     recipe="xmodal-ctx", weights=clip_weights, index="flat", image_shards=num_shards,
                     phrase_shards=num_shards, image_batch=4, text_batch=64, num_workers=2, device=device)
    # 3 train2014 images = 192 grid cells: a 16-word vocabulary; dim 0 = the detector's width (tiny: 32)
    xlxmert_pipeline(images=images, out=xlxmert, dataset="coco", weights=xlxmert_weights, arch=xlxmert_arch,
                     num_shards=num_shards, device=device, batch_size=4, num_workers=2, k=16, dim=0,
                     assign_shards=num_shards)
    # a TINY matcher: random weights, or (--param matcher=) trained for 2 epochs on the sample's captions from
    # random backbones; small blocks, batches and pages so that every step fans out
    vokens_pipeline(corpus=corpus, images=vokens_images, image_set="coco_sample", image_root=images, out=vokens,
                    tokenizer=tokenizer, matcher=matcher, config="tiny", key_batch=2, block_lines=16, page_lines=8,
                    tokenize_shards=num_shards, key_shards=num_shards, vokenize_shards=num_shards, device=device,
                    num_workers=0, train_captions=vokens_images, valid_captions=vokens_images, train_image_root=images,
                    bert_weights="random:1", resnet_weights="random:2", epochs=2, batch_size=4, valid_batch_size=4,
                    max_len=16, train_workers=0)


def local_params(sample: str, run_dir: str) -> dict:
    """The demo's parameters for the bundled sample, writing into ``run_dir`` (VOLTA's corpus layout)."""
    return {
        "karpathy": f"{sample}/dataset_coco.json",
        "test1k_ids": f"{sample}/test1k_ids.txt",
        "images": f"{sample}/images",
        "mscoco": f"{run_dir}/mscoco",
        "annotations": f"{run_dir}/mscoco/annotations",
        "attributes": f"{sample}/vg/attributes.json",
        "relationships": f"{sample}/vg/relationships.json",
        "context": f"{run_dir}/xmodal_ctx",
        "xlxmert": f"{run_dir}/xlxmert",
        "corpus": f"{sample}/vokens/valid.pkl.txt",
        "vokens_images": f"{sample}/vokens/mscoco_sample.json",
        "tokenizer": f"{sample}/vokens/wordpiece-sample/vocab.txt",  # a file: a folder loads only when local
        "vokens": f"{run_dir}/vokens",
    }
