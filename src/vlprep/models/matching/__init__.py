"""Maria's sentence-level image-text matcher and the vokenization steps built on it.

Upstream: jokieleung/Maria ``retrieval_model/`` (a fork of airsplay/vokenization), read at 51ac07d.

- ``config``     architectures (Maria's full size, a tiny one for tests) and published weight names; training settings
- ``model``      BERT [CLS] of the last four layers -> MLP, ResNeXt -> MLP; Maria's ``BEST.pth`` layout
- ``tokenizer``  the BERT tokenizer (HF name, folder or vocab file) and caption encoding for training
- ``images``     image decoding and Maria's train / eval transforms, a batch loader over image URIs
- ``loss``       the paired hinge rank loss and in-batch recall
- ``train``      Maria's training recipe: DDP under torchrun, per-epoch checkpoint, resume, ``BEST.pth``
- ``keys``       image sets (ids in a stated order) and their L2-normalised keys, per shard and merged
- ``vokenize``   exact faiss search of each corpus line's sentence embedding, per line range and merged
"""
