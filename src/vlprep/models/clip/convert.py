"""State-dict conversion between open_clip and Hugging Face ``CLIPModel`` names."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from vlprep import VlprepError

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
