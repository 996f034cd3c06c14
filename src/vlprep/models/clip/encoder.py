"""Loading CLIP models (open_clip, HF or TorchScript weights, ``random:<seed>``) and the context encoder."""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlprep import VlprepError
from vlprep.models import weights as wts
from vlprep.models.clip.convert import hf_to_open_clip_state_dict
from vlprep.models.clip.preprocess import preprocess
from vlprep.models.clip.recipes import Recipe, get_recipe
from vlprep.models.clip.tokenize import tokenize

log = logging.getLogger("vlprep.models.clip")


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


DEFAULT_TAG = "openai"  # what ``default`` means: OpenAI's CLIP, the model both upstreams use


def published_weights(arch: str) -> str | None:
    """The file open_clip downloads for ``arch``'s :data:`DEFAULT_TAG` (its HF hub copy, else its URL)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, DEFAULT_TAG)
    if cfg.get("hf_hub"):
        repo, _, name = cfg["hf_hub"].rpartition("/")  # "org/model/" names the repo; "org/model/file" a file
        from open_clip.constants import HF_WEIGHTS_NAME

        return f"https://huggingface.co/{repo}/resolve/main/{name or HF_WEIGHTS_NAME}"
    return cfg.get("url") or None


def pin_weights(spec: str, arch: str, model_cfg: Mapping | None = None) -> tuple[str, str]:
    """``default`` -> the published :data:`DEFAULT_TAG` file pinned ``#sha256=`` (downloaded now), or
    ``random:0`` and why (unreachable, or a ``model_cfg`` the published weights do not fit); see
    :func:`vlprep.models.weights.pin_default`. Other specs come back unchanged, with ""."""
    if str(spec) != wts.DEFAULT:
        return str(spec), ""
    unfit = f"model_cfg replaces the {arch} architecture: the published weights do not fit" if model_cfg else ""
    return wts.pin_default(spec, f"clip-{arch}", unfit=unfit, published=None if unfit else published_weights(arch))


def load_model(arch: str, spec: str, model_cfg: Mapping | None = None) -> tuple[torch.nn.Module, LoadedWeights]:
    """An open_clip ``CLIP`` of architecture ``arch`` (QuickGELU, as OpenAI's), in eval mode on CPU.

    ``spec``: ``default`` (:func:`pin_weights`), an open_clip pretrained tag, a checkpoint file / URL,
    or ``random:<seed>``."""
    import open_clip

    cfg = dict(model_cfg or {})
    spec, fallback = pin_weights(spec, arch, cfg)
    seed = wts.parse_random_spec(spec)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    try:
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True, **cfg)
            why = f"; the published weights were not used: {fallback}" if fallback else ""
            info = LoadedWeights(arch, spec, True, f"{arch} RANDOM weights (seed {seed}): not a trained model{why}",
                                 bool(cfg))
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
    weights: str | Mapping[str, str] = wts.DEFAULT
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
