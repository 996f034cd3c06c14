"""Matcher architectures, the published weights they start from, and the training settings.

``maria`` is the model Maria trains (``scripts/run_xmatching.bash``): ``bert-base-uncased`` with the
[CLS] vectors of hidden layers -4..-1 concatenated (3072) -> MLP 1024-1024-512, and torchvision
``resnext101_32x8d`` (ImageNet weights, ``fc`` removed, frozen batch norm) -> MLP 1024-1024-512; both
outputs L2-normalised. ``tiny`` keeps every structural feature (BERT, grouped-convolution bottlenecks,
frozen batch norm, four concatenated layers, three-layer heads) at a size that runs on a CPU in tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from vlprep import VlprepError

# Published weights (weight specs, see vlprep.models.weights). BERT and its tokenizer are Hugging Face names.
BERT_BASE_UNCASED = "bert-base-uncased"
# torchvision ResNeXt101_32X8D_Weights.IMAGENET1K_V1: what `resnext101_32x8d(pretrained=True)` loaded.
RESNEXT101_32X8D_IMAGENET = "https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth"
# Maria's trained matcher has no public download: pass its BEST.pth as a path, gs:// or URL spec.

_BERT_BASE = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "pad_token_id": 0,
}


@dataclass(frozen=True)
class MatcherConfig:
    """One matcher architecture and its image transform sizes."""

    name: str
    bert: Mapping = field(default_factory=lambda: dict(_BERT_BASE))  # transformers BertConfig arguments
    lang_layers: tuple[int, ...] = (-4, -3, -2, -1)  # hidden states whose [CLS] vectors are concatenated
    # torchvision ResNet(Bottleneck, layers, groups=, width_per_group=); the full one is resnext101_32x8d
    resnet_layers: tuple[int, ...] = (3, 4, 23, 3)
    resnet_groups: int = 32
    resnet_width_per_group: int = 8
    head_dims: tuple[int, ...] = (1024, 1024, 512)  # both MLP heads; the last is the joint dimension
    head_dropout: float = 0.2
    resize: int = 256  # eval transform: Resize(resize) -> CenterCrop(crop); train: RandomResizedCrop(crop)
    crop: int = 224

    @property
    def dim(self) -> int:
        return self.head_dims[-1]

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


MARIA = MatcherConfig(name="maria")
TINY = MatcherConfig(
    name="tiny",
    # initializer_range 0.5 (BERT's is 0.02): random-weight [CLS] vectors of different sentences then
    # differ (cos ~0.8 instead of 0.99999), so tests and demos with random weights retrieve different
    # images. No BERT dropout: in train mode (Maria keeps it on) it would swamp that random signal.
    bert={**_BERT_BASE, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
          "intermediate_size": 64, "initializer_range": 0.5, "hidden_dropout_prob": 0.0,
          "attention_probs_dropout_prob": 0.0},
    resnet_layers=(1, 1, 1, 1),
    resnet_groups=4,
    resnet_width_per_group=4,
    head_dims=(64, 64, 32),
    resize=64,
    crop=56,
)
CONFIGS = {c.name: c for c in (MARIA, TINY)}


def get_config(config: str | Mapping | MatcherConfig) -> MatcherConfig:
    """A named configuration (``maria``, ``tiny``), or one given as a dict (``MatcherConfig.to_dict``)."""
    if isinstance(config, MatcherConfig):
        return config
    if isinstance(config, Mapping):
        fields = dict(config)
        try:
            for key in ("lang_layers", "resnet_layers", "head_dims"):
                if key in fields:
                    fields[key] = tuple(fields[key])
            return MatcherConfig(**fields)
        except TypeError as e:
            raise VlprepError(f"matcher config {config!r}: {e}") from None
    try:
        return CONFIGS[config]
    except KeyError:
        raise VlprepError(f"unknown matcher config {config!r}; use one of {', '.join(CONFIGS)}") from None


@dataclass(frozen=True)
class TrainSettings:
    """Training hyper-parameters (``train.train``); here, without torch, so that the CLI (and `vlprep doctor`
    in the captions image, which has no torch) builds its options from them."""

    epochs: int = 25
    batch_size: int = 512  # global: each of N processes takes batch_size // N
    lr: float = 1e-3
    margin: float = 0.5
    grad_clip: float = 5.0
    max_len: int = 75
    valid_batch_size: int = 256
    seed: int = 9595
    num_workers: int = 8  # DataLoader workers per process
    reshuffle_each_epoch: bool = False
