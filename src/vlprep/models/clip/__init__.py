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

**Weights** (per model): ``default`` (the file of open_clip's ``openai`` tag, downloaded once, cached and
pinned ``#sha256=`` by :func:`pin_weights`; ``random:0``, loudly flagged, when it cannot be fetched or a
``model_cfg`` replaces the architecture; ``$VLPREP_WEIGHTS_URL_CLIP_VIT_B_32`` etc. name a mirror), an
open_clip pretrained tag (``openai``: open_clip's own download), a local file or URL (resolved by
:mod:`vlprep.models.weights`; open_clip or HF ``CLIPModel`` state dicts, or OpenAI's TorchScript
``.pt``), or ``random:<seed>`` (deterministic init of the real architecture, flagged as random). A
``model_cfg`` (open_clip model config dict: ``embed_dim``, ``vision_cfg``, ``text_cfg``) replaces the
named architecture, for tiny test models.
"""

from vlprep.models.clip.convert import hf_to_open_clip_state_dict, open_clip_to_hf_state_dict
from vlprep.models.clip.encoder import (
    ClipContextEncoder,
    LoadedWeights,
    load_model,
    pin_weights,
    published_weights,
    read_state_dict,
    text_eos,
    vision_tokens,
)
from vlprep.models.clip.preprocess import center_crop_box, preprocess, resize_short_side
from vlprep.models.clip.recipes import (
    CLIP_MEAN,
    CLIP_STD,
    CONTEXT_LENGTH,
    HAAV,
    IMAGE_SIZE,
    PREPROCESS_HF417,
    PREPROCESS_OPENAI,
    RECIPES,
    XC_TOKEN_LIMIT,
    XMODAL_CTX,
    Recipe,
    get_recipe,
)
from vlprep.models.clip.tokenize import tokenize
