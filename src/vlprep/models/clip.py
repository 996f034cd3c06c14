r"""CLIP encoders for cross-modal context, on open_clip, in two recipes that reproduce their upstreams.

``xmodal-ctx`` (GT-RIPL/Xmodal-Ctx, HF ``CLIPModel`` openai/clip-vit-base-patch32, transformers 4.17.0)
    one ViT-B-32 does everything.
    - visual context: vision pooler output = ``ln_post(CLS)``, before the projection, 768-d, not normalized;
    - image query: that pooler output ``@ visual.proj``, L2-normalized, 512-d;
    - caption values ("features"): text pooler output = ``ln_final(x)[EOS]``, before the projection, 512-d;
    - caption keys: ``values @ text_projection``, L2-normalized, 512-d.
``haav`` (GT-RIPL/HAAV, OpenAI ``clip`` package, fp32 on CPU)
    - visual context from ViT-B-32: ``pooled`` = ``ln_post(CLS) @ proj`` L2-normalized (512), ``grid`` =
      all 50 transformer output tokens *before* ``ln_post`` (50x768);
    - caption keys/values and image queries from ViT-L-14: keys = ``ln_final(x)[EOT] @ text_projection``
      normalized, values = ``x[EOT]`` *before* ``ln_final`` (768), query = ``encode_image`` normalized (768).

EOS/EOT position: ``argmax`` of the token ids (EOS 49407 is the largest id), as HF 4.17 and
``clip`` do. A sequence cut before its EOS therefore pools at the BOS token (id 49406, the
largest id left).

**Text tokens.**
- xmodal-ctx: the slow HF ``CLIPTokenizer`` (4.17's ``CLIPProcessor`` names only the slow class),
  with ftfy installed (ftfy 5.8 in XC's environment): text = ``regex.sub(r"\s+", " ", ftfy.fix_text(t))
  .strip().lower()``, then CLIP BPE (open_clip ships the same vocabulary); ``[BOS] ids [EOS]``, not
  truncated by the tokenizer. ``collate_tokens`` then keeps the first 75 tokens (a phrase of more than
  73 BPE tokens loses its EOS and pools at BOS, where open_clip's ``tokenize`` would keep 77 tokens
  and force EOT last) and right-pads with 0; under the causal mask, padding never changes the EOS
  output, so up to 73 BPE tokens the EOS position and output equal open_clip's. Unlike
  ``clip``/open_clip, HF does not also ``html.unescape`` (ftfy alone unescapes entities in text
  without ``<``). transformers 5.x's ``CLIPTokenizer`` (Rust, NFC instead of ftfy) agrees on plain
  text but not on HTML entities or text ftfy would repair.
- haav: ``clip.tokenize`` (context 77; the cleaning does ``html.unescape`` twice). Upstream raises on
  a text of more than 75 BPE tokens; here, as open_clip does, such a text is cut and ends in EOT.
Both recipes run the text tower on the batch's longest sequence instead of all 77 positions: with
the causal mask the EOS output is the same (up to float rounding).

**Image preprocessing** (each crop and the whole image, after ``convert("RGB")``):
- xmodal-ctx: 4.17 ``CLIPFeatureExtractor``: short side to 224 (long side ``int(224*long/short)``, PIL
  bicubic, skipped when the short side is already 224), then centre crop with
  ``top = int((H - 224 + 1) * 0.5)`` (rounds a half pixel *up*), float32 ``/255``, CLIP mean/std.
- haav: the ``clip`` transform: torchvision ``Resize(224, bicubic)`` (same size rule, PIL bicubic),
  ``CenterCrop(224)`` with ``top = int(round((H - 224) / 2))`` (half to even), ``ToTensor``, same mean/std.
The two differ by one pixel of crop offset when ``H - 224`` (or ``W - 224``) is odd and
``(H - 224) // 2`` is even (e.g. a long side of 293 or 313 after resizing); otherwise they are
identical, pixel for pixel. open_clip's own eval transform is the torchvision one (= haav). Today's
transformers ``CLIPImageProcessor`` reproduces neither: see :func:`preprocess`.

**Weights** (per model): an open_clip pretrained tag (``openai``), a local file or URL (resolved by
:mod:`vlprep.models.weights`; open_clip or HF ``CLIPModel`` state dicts, or OpenAI's TorchScript
``.pt``), or ``random:<seed>`` (deterministic init of the real architecture, flagged as random). A
``model_cfg`` (open_clip model config dict: ``embed_dim``, ``vision_cfg``, ``text_cfg``) replaces the
named architecture, for tiny test models.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlprep import VlprepError
from vlprep.models import weights as wts

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 224

PREPROCESS_HF417 = "hf-4.17"  # transformers 4.17 CLIPFeatureExtractor (xmodal-ctx)
PREPROCESS_OPENAI = "openai"  # clip.load transform = torchvision Resize/CenterCrop (haav, open_clip)

XC_TOKEN_LIMIT = 75  # collate_tokens' LENGTH_LIMIT
CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class Recipe:
    """What one upstream computes: models, outputs, top-k and preprocessing."""

    name: str
    image_model: str  # open_clip architecture of the visual context
    text_model: str  # architecture of caption keys/values and image queries
    topk: tuple[int, int, int]  # retrieved captions per whole image, per five-crop, per nine-crop
    vis_ctx: str  # "cls" (XC: ln_post(CLS), unprojected) or "pooled_grid" (HV: projected CLS + raw tokens)
    preprocess: str  # PREPROCESS_HF417 or PREPROCESS_OPENAI
    tokenizer: str  # "hf-75" (HF slow tokenizer, cut to 75) or "openai-77" (clip.tokenize)
    values_after_ln_final: bool  # caption values taken after (XC) or before (HV) ln_final
    dims: Mapping[str, tuple[int, ...]]  # output shapes of the full-size models, per item
    caption_values_name: str  # dataset name of the values in caption_db.hdf5
    caption_batch: int = 512
    image_batch: int = 32


XMODAL_CTX = Recipe(
    name="xmodal-ctx",
    image_model="ViT-B-32",
    text_model="ViT-B-32",
    topk=(16, 16, 16),
    vis_ctx="cls",
    preprocess=PREPROCESS_HF417,
    tokenizer="hf-75",
    values_after_ln_final=True,
    dims={"vis_ctx": (768,), "query": (512,), "key": (512,), "value": (512,)},
    caption_values_name="features",
)
HAAV = Recipe(
    name="haav",
    image_model="ViT-B-32",
    text_model="ViT-L-14",
    topk=(128, 32, 16),
    vis_ctx="pooled_grid",
    preprocess=PREPROCESS_OPENAI,
    tokenizer="openai-77",
    values_after_ln_final=False,
    dims={"pooled": (512,), "grid": (50, 768), "query": (768,), "key": (768,), "value": (768,)},
    caption_values_name="values",
)
RECIPES = {r.name: r for r in (XMODAL_CTX, HAAV)}


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    try:
        return RECIPES[name]
    except KeyError:
        raise VlprepError(f"unknown context recipe {name!r}; use one of {', '.join(RECIPES)}") from None


# ---------------------------------------------------------------- image preprocessing


def resize_short_side(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Short side to ``size``, long side ``int(size * long / short)``, PIL bicubic (HF 4.17 = torchvision)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop_box(width: int, height: int, size: int, rule: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre crop under ``rule`` (see the module docstring)."""
    if rule == PREPROCESS_HF417:
        top, left = int((height - size + 1) * 0.5), int((width - size + 1) * 0.5)
    elif rule == PREPROCESS_OPENAI:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    else:
        raise VlprepError(f"unknown preprocessing {rule!r}; use {PREPROCESS_HF417!r} or {PREPROCESS_OPENAI!r}")
    return left, top, left + size, top + size


def preprocess(image: Image.Image, rule: str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """One PIL image -> (3, size, size) float32, normalized with the CLIP mean/std.

    The centre-crop offset of an odd margin ``d = H - 224`` differs between implementations:
    HF 4.17 ``CLIPFeatureExtractor`` (XC) takes ``ceil(d / 2)``, torchvision / ``clip`` / open_clip (HV)
    ``round(d / 2)`` half to even, and today's transformers (5.x ``CLIPImageProcessor``, both backends)
    ``floor(d / 2)``. Measured on one photo: a 640x427 COCO image (resized to 335x224) gives XC = HV
    but HF 5.x one pixel off (max abs diff 1.3 after normalization); 640x458 gives XC one pixel off HV
    and HF 5.x. HF 5.x's default (torchvision) backend also resizes tensors with antialiased bicubic,
    which differs from PIL's bicubic by up to ~1.5e-2 even where the crop agrees. open_clip's eval
    transform equals the ``openai`` rule here exactly (max abs diff 0).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = resize_short_side(image, size)
    image = image.crop(center_crop_box(*image.size, size, rule))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


# ---------------------------------------------------------------- tokenization


def _hf_clean(text: str) -> str:
    """HF 4.17 slow ``CLIPTokenizer`` cleaning with ftfy installed (no extra ``html.unescape``)."""
    import ftfy
    import regex

    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


_TOKENIZERS: dict[str, object] = {}


def _simple_tokenizer(kind: str):
    if kind not in _TOKENIZERS:
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer(context_length=CONTEXT_LENGTH)
        if kind == "hf-75":
            tok.clean_fn = _hf_clean
        _TOKENIZERS[kind] = tok
    return _TOKENIZERS[kind]


def tokenize(texts: Sequence[str], kind: str) -> torch.Tensor:
    """Token ids (N, L), right-padded with 0 to the longest sequence.

    ``hf-75``: XC (``[BOS] ids [EOS]`` cut to 75 tokens). ``openai-77``: HAAV (``clip.tokenize``; a text
    over 77 tokens is cut and ends in EOT). L is the batch's longest sequence, at most 75 / 77.
    """
    if kind not in ("hf-75", "openai-77"):
        raise VlprepError(f"unknown tokenizer {kind!r}; use 'hf-75' or 'openai-77'")
    tok = _simple_tokenizer(kind)
    seqs = []
    for text in texts:
        ids = [tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id]
        if kind == "hf-75":
            ids = ids[:XC_TOKEN_LIMIT]
        elif len(ids) > CONTEXT_LENGTH:
            ids = ids[:CONTEXT_LENGTH]
            ids[-1] = tok.eot_token_id
        seqs.append(ids)
    out = torch.zeros((len(seqs), max((len(s) for s in seqs), default=0)), dtype=torch.long)
    for i, ids in enumerate(seqs):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


# ---------------------------------------------------------------- state dict conversion

_BLOCK_MAP = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_PLAIN_MAP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_TOWERS = {"transformer.resblocks.": "text_model.encoder.layers.", "visual.transformer.resblocks.": "vision_model.encoder.layers."}
_BLOCK_RE = re.compile(r"^(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")


def open_clip_to_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip ViT ``CLIP`` state dict as a transformers ``CLIPModel`` state dict (same tensors)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _PLAIN_MAP:
            out[_PLAIN_MAP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _BLOCK_RE.match(key):
            prefix = _TOWERS[m.group(1)] + m.group(2) + "."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for src, dst in _BLOCK_MAP.items():
                if rest.startswith(src):
                    out[prefix + dst + rest[len(src):]] = value
                    break
            else:
                raise VlprepError(f"open_clip key {key!r} has no transformers CLIPModel counterpart")
        elif key != "attn_mask":
            raise VlprepError(f"open_clip key {key!r} has no transformers CLIPModel counterpart")
    return out


def hf_to_open_clip_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel`` state dict as an open_clip ``CLIP`` state dict (inverse of the above)."""
    plain = {v: k for k, v in _PLAIN_MAP.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    towers = {v.split(".")[0]: k for k, v in _TOWERS.items()}
    block = {v: k for k, v in _BLOCK_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in plain:
            out[plain[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif m := _HF_BLOCK_RE.match(key):
            prefix = towers[m.group(1)] + m.group(2) + "."
            rest = m.group(3)
            if q := re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                qkv.setdefault((prefix, q.group(2)), {})[q.group(1)] = value
                continue
            for src, dst in block.items():
                if rest.startswith(src):
                    out[prefix + dst + rest[len(src):]] = value
                    break
            else:
                raise VlprepError(f"transformers key {key!r} has no open_clip counterpart")
        else:
            raise VlprepError(f"transformers key {key!r} has no open_clip counterpart")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise VlprepError(f"{prefix}: incomplete q/k/v projections in the transformers state dict")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---------------------------------------------------------------- loading models


@dataclass(frozen=True)
class LoadedWeights:
    """Where a model's weights came from; ``is_random`` models are not trained models."""

    arch: str
    spec: str
    is_random: bool
    description: str
    custom_cfg: bool = False


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict from a file: safetensors, ``torch.save`` (weights only), or OpenAI's TorchScript.

    HF ``CLIPModel`` keys are converted to open_clip's. ``{"state_dict": ...}`` and ``module.`` prefixes
    are unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: dict = load_file(str(path), device="cpu")
    elif _is_torchscript(path):
        # OpenAI's released .pt files are TorchScript archives (tensors + TorchScript code, no pickled
        # Python objects); open_clip reads them the same way.
        sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        for key in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(key, None)
    else:
        with open(path, "rb") as f:
            data = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        sd = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(sd, dict) or not sd:
        raise VlprepError(f"{path}: no state dict found; expected an open_clip, OpenAI or HF CLIP checkpoint")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        sd = hf_to_open_clip_state_dict(sd)
    return sd


def load_model(arch: str, spec: str, model_cfg: Mapping | None = None) -> tuple[torch.nn.Module, LoadedWeights]:
    """An open_clip ``CLIP`` of architecture ``arch`` (QuickGELU, as OpenAI's), in eval mode on CPU."""
    import open_clip

    cfg = dict(model_cfg or {})
    spec = str(spec)
    seed = wts.parse_random_spec(spec)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    try:
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True, **cfg)
            info = LoadedWeights(arch, spec, True, f"{arch} RANDOM weights (seed {seed}): not a trained model", bool(cfg))
        elif spec in tags and not Path(spec).exists():
            if cfg:
                raise VlprepError(f"model_cfg cannot be combined with the pretrained tag {spec!r}")
            quick = open_clip.get_pretrained_cfg(arch, spec).get("quick_gelu", False)
            model = open_clip.create_model(arch, pretrained=spec, force_quick_gelu=quick)
            info = LoadedWeights(arch, spec, False, f"{arch} open_clip pretrained {spec!r}")
        else:
            resolved = wts.resolve(spec)
            model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True, **cfg)
            sd = read_state_dict(resolved.path)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise VlprepError(
                    f"{resolved.path}: not a {arch} CLIP checkpoint (missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]})"
                )
            info = LoadedWeights(arch, spec, False, f"{arch} from {resolved.describe()}", bool(cfg))
    except RuntimeError as e:
        raise VlprepError(
            f"could not load {arch} weights {spec!r} ({e}). Offline, pass a local checkpoint file "
            "(open_clip, OpenAI .pt or HF CLIPModel) or random:<seed> for tests."
        ) from None
    _check_arch(model, arch)
    model.eval().requires_grad_(False)
    return model, info


def _check_arch(model: torch.nn.Module, arch: str) -> None:
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    v = getattr(model, "visual", None)
    ok = (
        isinstance(model, CLIP)
        and isinstance(v, VisionTransformer)
        and v.pool_type == "tok"
        and v.attn_pool is None
        and not v.final_ln_after_pool
        and model.text_pool_type == "argmax"
    )
    if not ok:
        raise VlprepError(f"{arch}: only OpenAI-style ViT CLIP models (CLS token, argmax EOT pooling) are supported")


# ---------------------------------------------------------------- the encoder


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def vision_tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """All transformer output tokens (N, 1 + grid^2, width), before ``ln_post``."""
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    return visual.transformer(x)


def text_eos(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Transformer output at each sequence's argmax token, before ``ln_final`` (N, width)."""
    n = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]


@dataclass
class ClipContextEncoder:
    """The models of one recipe, with batched image and text encoders (numpy float32 outputs).

    ``weights``: one spec for every model, or ``{"image": spec, "text": spec}``. XC uses one model for
    both roles. ``model_cfg`` replaces the architectures (tiny test models).
    """

    recipe: Recipe | str
    weights: str | Mapping[str, str] = "openai"
    model_cfg: Mapping | None = None
    device: str = "cpu"
    batch_size: int = 64
    loaded: dict[str, LoadedWeights] = field(init=False)

    def __post_init__(self) -> None:
        self.recipe = get_recipe(self.recipe)
        specs = dict(self.weights) if isinstance(self.weights, Mapping) else {"image": self.weights, "text": self.weights}
        if set(specs) != {"image", "text"}:
            raise VlprepError("weights: give one spec, or a dict with keys 'image' and 'text'")
        shared = self.recipe.image_model == self.recipe.text_model
        if shared and specs["image"] != specs["text"]:
            raise VlprepError(f"{self.recipe.name} uses one model for images and text; give one weights spec")
        self._models: dict[str, torch.nn.Module] = {}
        self.loaded = {}
        for role, arch in (("image", self.recipe.image_model), ("text", self.recipe.text_model)):
            if role == "text" and shared:
                self._models["text"], self.loaded["text"] = self._models["image"], self.loaded["image"]
                continue
            model, info = load_model(arch, specs[role], self.model_cfg)
            self._models[role], self.loaded[role] = model.to(self.device), info
            log.info("%s %s model: %s", self.recipe.name, role, info.description)

    def model(self, role: str) -> torch.nn.Module:
        """The open_clip model of ``role`` ("image": visual context; "text": keys, values and queries)."""
        return self._models[role]

    @property
    def is_random(self) -> bool:
        return any(i.is_random for i in self.loaded.values())

    @property
    def dims(self) -> dict[str, tuple[int, ...]]:
        """Per-item output shapes of the loaded models (the recipe's ``dims`` for full-size models)."""
        img, txt = self._models["image"], self._models["text"]
        width = img.visual.conv1.out_channels
        tokens = img.visual.positional_embedding.shape[0]
        out = {"query": (txt.visual.proj.shape[1],), "key": (txt.text_projection.shape[1],),
               "value": (txt.transformer.width,)}
        if self.recipe.vis_ctx == "cls":
            out["vis_ctx"] = (width,)
        else:
            out["pooled"], out["grid"] = (img.visual.proj.shape[1],), (tokens, width)
        return out

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, 224, 224) with the recipe's preprocessing."""
        return torch.stack([preprocess(im, self.recipe.preprocess) for im in images])

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Preprocessed pixels -> the recipe's image outputs (``vis_ctx``/``query`` or ``pooled``/``grid``/``query``)."""
        names = self._image_outputs() if outputs is None else list(outputs)
        bad = set(names) - set(self._image_outputs())
        if bad:
            raise VlprepError(f"{self.recipe.name} has no image output {sorted(bad)}; choose from {self._image_outputs()}")
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size].to(self.device)
            for name, value in self._encode_batch(batch, names).items():
                parts[name].append(value.float().cpu().numpy())
        return {n: np.concatenate(v) if v else np.zeros((0,) + self.dims[n], np.float32) for n, v in parts.items()}

    def encode_images(self, images: Sequence[Image.Image], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """PIL images -> dict of (N, ...) float32 arrays; ``outputs`` picks a subset (e.g. ``["query"]``)."""
        return self.encode_pixels(self.preprocess(images), outputs)

    def _image_outputs(self) -> list[str]:
        return ["vis_ctx", "query"] if self.recipe.vis_ctx == "cls" else ["pooled", "grid", "query"]

    def _encode_batch(self, pixels: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        visual, query_visual = self._models["image"].visual, self._models["text"].visual
        cls = None
        if visual is query_visual or any(n != "query" for n in names):
            tokens = vision_tokens(visual, pixels)
            cls = visual.ln_post(tokens[:, 0])
            if self.recipe.vis_ctx == "cls":
                out["vis_ctx"] = cls
            else:
                out["pooled"], out["grid"] = _l2(cls @ visual.proj), tokens
        if "query" in names:
            if visual is not query_visual:
                cls = query_visual.ln_post(vision_tokens(query_visual, pixels)[:, 0])
            out["query"] = _l2(cls @ query_visual.proj)
        return {n: out[n] for n in names}

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Captions -> (keys (N, d_key) L2-normalized, values (N, d_value)), float32."""
        model = self._models["text"]
        keys, values = [], []
        for start in range(0, len(texts), self.batch_size):
            ids = tokenize(texts[start : start + self.batch_size], self.recipe.tokenizer).to(self.device)
            eos = text_eos(model, ids)
            post = model.ln_final(eos)
            keys.append(_l2(post @ model.text_projection).float().cpu().numpy())
            values.append((post if self.recipe.values_after_ln_final else eos).float().cpu().numpy())
        if not keys:
            d = self.dims
            return np.zeros((0,) + d["key"], np.float32), np.zeros((0,) + d["value"], np.float32)
        return np.concatenate(keys), np.concatenate(values)
