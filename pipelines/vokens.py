"""Maria's vokenization: [train] -> tokenize (fan-out) -> keys (GPU fan-out) -> index -> vokenize (GPU fan-out) -> merge.

Training is optional through a condition on the ``matcher`` parameter: empty, ``vokens_train`` trains one
(one pod, all its GPUs; resumes from its last epoch on a retry); given, ``vokens_matcher`` checks it and no
GPU pod starts for training. ``dsl.OneOf`` hands the branch's matcher spec to the keys and vokens steps.
Tokenization does not need the matcher and runs beside training.
"""

from kfp import dsl
from vlprep_components.config import PARALLELISM, configure
from vlprep_components.vokens import (
    vokens_keys,
    vokens_keys_merge,
    vokens_keys_plan,
    vokens_matcher,
    vokens_merge,
    vokens_plan,
    vokens_tokenize,
    vokens_tokenize_merge,
    vokens_tokenize_plan,
    vokens_train,
    vokens_vokenize,
)


@dsl.pipeline(name="vokens",
              description="Maria vokenization: tokens (.hdf5/.line), image keys (.hdf5/.path/.ids), top-5 vokens")
def vokens(  # a pipeline's parameters are its users' settings (vlprep.stages.vokens.Settings)
    corpus: str,
    images: str,
    image_set: str,
    out: str,
    tokenizer: str = "bert-base-uncased",
    matcher: str = "",
    config: str = "maria",
    image_root: str = "",
    drop_empty: bool = False,
    retrieval_input: str = "",
    topk: int = 5,
    max_images: int = -1,
    key_batch: int = 512,
    block_lines: int = 65536,
    page_lines: int = 512,
    tokenize_shards: int = 4,
    key_shards: int = 8,
    vokenize_shards: int = 8,
    split: str = "balanced",
    device: str = "auto",
    num_workers: int = 4,
    train_captions: str = "",
    valid_captions: str = "",
    train_image_root: str = "",
    bert_weights: str = "bert-base-uncased",
    resnet_weights: str = "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth",
    epochs: int = 25,
    batch_size: int = 512,
    lr: float = 1e-3,
    margin: float = 0.5,
    grad_clip: float = 5.0,
    max_len: int = 75,
    valid_batch_size: int = 256,
    seed: int = 9595,
    train_workers: int = 8,
    reshuffle_each_epoch: bool = False,
):
    with dsl.If(matcher == "", name="train-matcher"):
        trained = configure(vokens_train(
            out=out, train_captions=train_captions, valid_captions=valid_captions, train_image_root=train_image_root,
            config=config, tokenizer=tokenizer, bert_weights=bert_weights, resnet_weights=resnet_weights, epochs=epochs,
            batch_size=batch_size, lr=lr, margin=margin, grad_clip=grad_clip, max_len=max_len,
            valid_batch_size=valid_batch_size, seed=seed, num_workers=train_workers,
            reshuffle_each_epoch=reshuffle_each_epoch))
    with dsl.Else(name="given-matcher"):
        given = configure(vokens_matcher(matcher=matcher))
    spec = dsl.OneOf(trained.output, given.output)

    tplan = configure(vokens_tokenize_plan(corpus=corpus, tokenizer=tokenizer, retrieval_input=retrieval_input,
                                           drop_empty=drop_empty, block_lines=block_lines, out=out,
                                           num_shards=tokenize_shards, split=split))
    with dsl.ParallelFor(tplan.output, parallelism=PARALLELISM) as shard:
        tokenized = configure(vokens_tokenize(spec=shard))
    tokens = configure(vokens_tokenize_merge(shards=dsl.Collected(tokenized.output), out=out, corpus=corpus,
                                             tokenizer=tokenizer))

    kplan = configure(vokens_keys_plan(images=images, image_set=image_set, image_root=image_root, matcher=spec,
                                       config=config, batch_size=key_batch, out=out, num_shards=key_shards,
                                       split=split))
    with dsl.ParallelFor(kplan.output, parallelism=PARALLELISM) as shard:
        extracted = configure(vokens_keys(spec=shard, device=device, num_workers=num_workers))
    keys = configure(vokens_keys_merge(shards=dsl.Collected(extracted.output), out=out, image_set=image_set))

    vplan = configure(vokens_plan(tokens=tokens.output, keys=keys.output, matcher=spec, config=config, topk=topk,
                                  max_images=max_images, page_lines=page_lines, out=out, num_shards=vokenize_shards,
                                  split=split))
    with dsl.ParallelFor(vplan.output, parallelism=PARALLELISM) as shard:
        searched = configure(vokens_vokenize(spec=shard, device=device))
    configure(vokens_merge(shards=dsl.Collected(searched.output), out=out, tokens=tokens.output))
