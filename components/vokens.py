"""Maria's vokenization. See vlprep.stages.vokens.

[train (GPUs of one pod) | matcher (given)] ; tokenize_plan -> tokenize (per line range) -> tokenize_merge ;
keys_plan -> keys (per image block, GPU) -> keys_merge ; plan (index) -> vokenize (per page range, GPU) -> merge

Every component takes the pipeline's ``out``; the stage's ``layout(out)`` names its folder there.
"""

from kfp import dsl
from vlprep_components.config import component


@component
def vokens_train(  # one parameter per TrainJob / TrainSettings field
    out: str, train_captions: str, valid_captions: str, train_image_root: str, config: str, tokenizer: str,
    bert_weights: str, resnet_weights: str, epochs: int, batch_size: int, lr: float, margin: float, grad_clip: float,
    max_len: int, valid_batch_size: int, seed: int, num_workers: int, reshuffle_each_epoch: bool,
) -> str:
    import logging

    from vlprep.models.matching.train import TrainSettings
    from vlprep.stages import vokens

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = TrainSettings(
        epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), margin=float(margin), grad_clip=float(grad_clip),
        max_len=int(max_len), valid_batch_size=int(valid_batch_size), seed=int(seed), num_workers=int(num_workers),
        reshuffle_each_epoch=bool(reshuffle_each_epoch))
    job = vokens.train_job(vokens.layout(out)["matcher"], train=train_captions, valid=valid_captions,
                           image_root=train_image_root, config=config, tokenizer=tokenizer, bert_weights=bert_weights,
                           resnet_weights=resnet_weights, settings=settings)
    return vokens.train(job)["matcher"]


@component
def vokens_matcher(matcher: str) -> str:
    from vlprep.stages import vokens

    return vokens.matcher(matcher)


@component
def vokens_tokenize_plan(corpus: str, tokenizer: str, retrieval_input: str, drop_empty: bool, block_lines: int,
                         out: str, num_shards: int, split: str) -> list:
    from vlprep.stages import vokens

    settings = vokens.TokenizeSettings(corpus=corpus, tokenizer=tokenizer, retrieval_input=retrieval_input,
                                       drop_empty=bool(drop_empty), block_lines=int(block_lines))
    return vokens.tokenize_plan(vokens.layout(out)["tokens"], settings, num_shards=int(num_shards), split=split)


@component
def vokens_tokenize(spec: dict) -> dict:
    from vlprep.stages import vokens

    marker = vokens.tokenize(spec)
    return {k: marker[k] for k in ("shard", "items", "skipped", "lines", "tokens", "empty")}


@component
def vokens_tokenize_merge(shards: list, out: str, corpus: str, tokenizer: str) -> dict:
    from vlprep.stages import vokens

    return vokens.tokenize_merge(vokens.layout(out)["tokens"], vokens.prefix_name(corpus, tokenizer))


@component
def vokens_keys_plan(images: str, image_set: str, image_root: str, matcher: str, config: str, batch_size: int,
                     out: str, num_shards: int, split: str) -> list:
    from vlprep.stages import vokens

    settings = vokens.KeySettings(images=images, image_set=image_set, matcher=matcher, config=config,
                                  image_root=image_root, batch_size=int(batch_size))
    return vokens.keys_plan(vokens.layout(out)["keys"], settings, num_shards=int(num_shards), split=split)


@component
def vokens_keys(spec: dict, device: str, num_workers: int) -> dict:
    from vlprep import stage
    from vlprep.stages import vokens

    marker = vokens.keys(spec, stage.Runtime(device=device, num_workers=int(num_workers)))
    return {k: marker[k] for k in ("shard", "items", "skipped", "images", "failed")}


@component
def vokens_keys_merge(shards: list, out: str, image_set: str) -> dict:
    from vlprep.stages import vokens

    return vokens.keys_merge(vokens.layout(out)["keys"], image_set)


@component
def vokens_plan(tokens: dict, keys: dict, matcher: str, config: str, topk: int, max_images: int, page_lines: int,
                out: str, num_shards: int, split: str) -> list:
    from vlprep.stages import vokens

    settings = vokens.make_settings(tokens=tokens["tokens"], keys=keys["keys"], matcher=matcher, config=config,
                                    image_sets=[keys["image_set"]], topk=int(topk), max_images=int(max_images),
                                    page_lines=int(page_lines))
    return vokens.plan(vokens.layout(out)["vokens"], settings, num_shards=int(num_shards), split=split)


@component
def vokens_vokenize(spec: dict, device: str) -> dict:
    from vlprep import stage
    from vlprep.stages import vokens

    marker = vokens.vokenize(spec, stage.Runtime(device=device))
    return {k: marker[k] for k in ("shard", "items", "skipped", "lines", "segmented")}


@component
def vokens_merge(shards: list, out: str, tokens: dict, report: dsl.Output[dsl.HTML]) -> dict:
    import shutil

    from vlprep import storage
    from vlprep.stages import vokens

    name = tokens["tokens"].rstrip("/").rsplit("/", 1)[-1]
    summary = vokens.merge(vokens.layout(out)["vokens"], name)
    summary["skipped_shards"] = sum(1 for s in shards if s["skipped"])
    with storage.open_read(summary["report"]) as src, open(report.path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return summary
