"""The matcher: two towers into one unit-sphere space, with the module and key names of Maria's ``JointModel``.

``Matcher.state_dict()`` is Maria's ``BEST.pth`` layout, key for key and in the same order:
``lang_model.backbone.*`` (BertModel, pooler included), ``lang_model.mlp.linears.{0,1,2}.*``,
``visn_model.backbone.*`` (torchvision ResNeXt with ``FrozenBatchNorm2d``: weight, bias, running_mean,
running_var; no ``fc``), ``visn_model.mlp.linears.{0,1,2}.*``.

Both backbones are frozen and run without gradients; only the heads train. In train mode BERT's
dropout is active, as in Maria (its ``JointModel`` is in train mode while the backbone runs under
``no_grad``). Heads: Linear -> ReLU -> dropout 0.2 between layers, none after the last.

Weight specs (vlprep.models.weights): a trained matcher is a ``BEST.pth`` (path, gs:// or URL), read
with ``torch.load(weights_only=True)``; a legacy ``lang_model.backbone.embeddings.position_ids`` (old
transformers) and ``module.`` prefixes (DDP) are dropped. Backbones for training: BERT from a Hugging Face
name or folder (``from_pretrained``) or a state-dict file; ResNeXt from torchvision's ImageNet file or
any state-dict file. ``random:<seed>`` gives a deterministic random init of the real architecture.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlprep import VlprepError
from vlprep.models import weights as wts
from vlprep.models.matching.config import MatcherConfig, get_config

log = logging.getLogger(__name__)

LEGACY_KEYS = ("lang_model.backbone.embeddings.position_ids",)


class MLP(nn.Module):
    """Maria's head: ``linears`` with ReLU and dropout between them."""

    def __init__(self, input_dim: int, dims: Sequence[int], dropout: float):
        super().__init__()
        sizes = (input_dim, *dims)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.linears) - 1
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < last:
                x = F.dropout(F.relu(x), self.dropout, training=self.training)
        return x


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(2, dim=-1, keepdim=True)


class SentenceEncoder(nn.Module):
    """Token ids -> unit sentence embedding from the [CLS] vectors of ``layers`` (Maria's ``Sent_LangModel``)."""

    def __init__(self, bert: nn.Module, layers: Sequence[int], dims: Sequence[int], dropout: float):
        super().__init__()
        self.backbone = bert.requires_grad_(False)
        self.layers = sorted(layers)
        self.mlp = MLP(bert.config.hidden_size * len(self.layers), dims, dropout)

    def cls_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, hidden * len(layers)): hidden_states[l][:, 0] for each layer l, concatenated."""
        with torch.no_grad():
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return torch.cat([out.hidden_states[layer][:, 0] for layer in self.layers], dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return unit(self.mlp(self.cls_features(input_ids, attention_mask)))


class ImageEncoder(nn.Module):
    """Pixels -> unit image embedding (Maria's ``VisnModel``)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, dims: Sequence[int], dropout: float):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.mlp = MLP(backbone_dim, dims, dropout)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.backbone(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return unit(self.mlp(self.features(pixels)))


class Matcher(nn.Module):
    """Maria's ``JointModel``: ``lang_model`` and ``visn_model``."""

    def __init__(self, lang_model: SentenceEncoder, visn_model: ImageEncoder):
        super().__init__()
        self.lang_model = lang_model
        self.visn_model = visn_model

    def forward(self, input_ids, attention_mask, pixels) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lang_model(input_ids, attention_mask), self.visn_model(pixels)

    def head_state(self) -> dict[str, torch.Tensor]:
        """The trainable part: both heads, under their full state-dict names."""
        return {k: v for k, v in self.state_dict().items() if ".mlp." in k}


# ---------------------------------------------------------------- backbones


def _seeded(seed: int, make):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _bert_config(config: MatcherConfig):
    from transformers import BertConfig

    return BertConfig(**dict(config.bert))


def _load_file_state(spec: str) -> dict[str, torch.Tensor]:
    """A state dict from a resolved file: safetensors, or torch.save read with weights_only=True."""
    path = wts.resolve(spec).path
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state, _ = wts.load_checkpoint(path)
    return {k: torch.as_tensor(v) for k, v in state.items()}


def _is_file_spec(spec: str) -> bool:
    return "://" in spec or Path(spec).is_file()


def build_bert(config: MatcherConfig, weights: str) -> nn.Module:
    """transformers ``BertModel`` of ``config.bert`` with ``weights`` (HF name/folder, file spec, random:<seed>)."""
    from transformers import BertModel

    seed = wts.parse_random_spec(weights)
    if seed is not None:
        return _seeded(seed, lambda: BertModel(_bert_config(config)))
    if not _is_file_spec(weights):
        try:
            bert = BertModel.from_pretrained(weights)
        except OSError as e:
            raise VlprepError(f"BERT weights {weights!r}: {e}. Offline, pass a local folder or state-dict file, "
                              "or random:<seed> for tests.") from None
        want = _bert_config(config)
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if getattr(bert.config, key) != getattr(want, key):
                raise VlprepError(f"BERT weights {weights!r}: {key} is {getattr(bert.config, key)}, the "
                                  f"{config.name} matcher needs {getattr(want, key)}")
        return bert
    state = _load_file_state(weights)
    if any(k.startswith("bert.") for k in state):  # BertForPreTraining / BertForMaskedLM checkpoints
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    bert = BertModel(_bert_config(config))
    _load_strict(bert, state, weights, ignore=("embeddings.position_ids",))
    return bert


def build_resnet(config: MatcherConfig, weights: str) -> tuple[nn.Module, int]:
    """torchvision ResNe(X)t of ``config`` with frozen batch norm and ``fc`` removed; (model, output dim)."""
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops.misc import FrozenBatchNorm2d

    def make():
        return ResNet(Bottleneck, list(config.resnet_layers), groups=config.resnet_groups,
                      width_per_group=config.resnet_width_per_group, norm_layer=FrozenBatchNorm2d)

    seed = wts.parse_random_spec(weights)
    net = _seeded(seed, make) if seed is not None else make()
    if seed is None:
        state = {k: v for k, v in _load_file_state(weights).items() if not k.startswith("fc.")}
        _load_strict(net, state, weights, ignore=("num_batches_tracked",), skip_missing=("fc.",))
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], spec: str, *,
                 ignore: Sequence[str] = (), skip_missing: Sequence[str] = ()) -> None:
    state = {k: v for k, v in state.items() if not any(k.endswith(s) for s in ignore)}
    expected = module.state_dict()
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state and not k.startswith(tuple(skip_missing))]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected or wrong:
        raise VlprepError(f"{spec}: does not fit the {type(module).__name__} expected (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}, wrong shape {wrong[:4]}); check the weights and the "
                          "matcher config")
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- the matcher


def build_matcher(config: str | MatcherConfig, *, bert_weights: str, resnet_weights: str,
                  head_seed: int = 0) -> Matcher:
    """A matcher to train: pretrained (or random) backbones, fresh heads initialised from ``head_seed``."""
    config = get_config(config)
    bert = build_bert(config, bert_weights)
    resnet, dim = build_resnet(config, resnet_weights)

    def heads():
        lang = SentenceEncoder(bert, config.lang_layers, config.head_dims, config.head_dropout)
        visn = ImageEncoder(resnet, dim, config.head_dims, config.head_dropout)
        return Matcher(lang, visn)

    return _seeded(head_seed, heads)


def read_matcher_state(spec: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``BEST.pth`` (Maria's state dict), legacy keys and DDP prefixes removed."""
    path = wts.resolve(spec).path
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VlprepError(f"{path}: not a readable matcher state dict ({first}); pass Maria's BEST.pth "
                          "(the state dict, not BEST.pth.model)") from None
    if not isinstance(state, Mapping):
        raise VlprepError(f"{path}: holds a {type(state).__name__}, not a state dict; pass Maria's BEST.pth")
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key not in LEGACY_KEYS and not key.endswith("num_batches_tracked"):
            out[key] = value
    return out


def load_matcher(spec: str, config: str | MatcherConfig = "maria") -> Matcher:
    """A trained matcher from its ``BEST.pth`` spec, or ``random:<seed>`` (random backbones and heads), in eval mode."""
    config = get_config(config)
    seed = wts.parse_random_spec(spec)
    if seed is not None:
        model = build_matcher(config, bert_weights=f"random:{seed}", resnet_weights=f"random:{seed + 1}",
                              head_seed=seed + 2)
        log.warning("matcher %s: RANDOM weights (seed %d), not a trained model", spec, seed)
        return model.eval()
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is overwritten below: skip the random init (seconds at full size)
        model = build_matcher(config, bert_weights="random:0", resnet_weights="random:0")
    _load_strict(model, read_matcher_state(spec), spec)
    return model.eval()


def maria_state_dict(model: Matcher) -> dict[str, torch.Tensor]:
    """``BEST.pth`` contents: the full state dict on CPU, in Maria's key order."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
