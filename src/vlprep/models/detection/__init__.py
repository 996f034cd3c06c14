"""Two-stage detectors in plain torch + torchvision.ops, assembled from generic parts.

- :mod:`.butd`: the bottom-up-attention Visual Genome Faster R-CNN (ResNet-101 C4 + attributes), for
  VOLTA / LXMERT region features; its box-selection recipes are in :mod:`.selection`.
- :mod:`.x152`: the vqa-maskrcnn-benchmark Visual Genome Faster R-CNN (ResNeXt-152 32x8d FPN), for
  X-LXMERT grid and box features; :mod:`.x152_config` reads its ``detectron_config.yaml``.

Parts: :mod:`.layers` (frozen BN, conv + norm), :mod:`.resnet` (stems, bottlenecks, bodies),
:mod:`.fpn`, :mod:`.boxes` (box coding, clipping, exact "+1" NMS), :mod:`.rpn`, :mod:`.roi_heads`
(poolers and box heads), :mod:`.preprocess` (resizes as upstream), :mod:`.batching` (size buckets,
device transfer, autocast), :mod:`.checkpoints` (key maps, strict loading, random init),
:mod:`.outputs` (per-image RoI-head outputs).
"""
