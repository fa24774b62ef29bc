"""HPSv2 and ImageReward raters, rebuilt from their published checkpoints on transformers' CLIP and BLIP classes.

Used by the rating stage (`actors/raters/specs.py`) for the `hpsv2:` and `imagereward:` specs. Neither package is
imported: both download weights and tokenizers at run time, hpsv2 pulls a CUDA torchvision, and image-reward 1.5
does not import under transformers 5. What they compute is reproduced here from the same checkpoint files:

- HPSv2 (Wu et al. 2023; `HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`): an open_clip ViT-H-14 fine-tuned on
  human preferences. score = cosine(image embedding, text embedding); unlike CLIP score, no logit scale. Images are
  resized so the longer side is 224 (bicubic, antialiased), zero-padded to a square, then CLIP-normalised.
- ImageReward (Xu et al. 2023; `ImageReward.pt`): BLIP's ViT-L/16 image encoder, a BERT-base text encoder that
  cross-attends to the image patches, and an MLP on the first token. score = (mlp(h) - 0.16717) / 1.03334, the
  normalisation the authors ship. Prompts are cut at 35 BERT tokens; images are resized (shorter side 224,
  bicubic) and centre-cropped.

Checkpoints are read with `torch.load(weights_only=True)` (plain tensors only, no code) or as `.safetensors`, and
every weight must match the model built, so a wrong file fails at load time instead of scoring nonsense.
tests/data/raters/ holds tiny checkpoints in both formats and the scores the packages' own code gives for them.
"""

from __future__ import annotations

import contextlib
import html
import itertools
import json
import os
import pickle
import re
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

# open_clip's ViT-H-14 model config: the architecture of both HPSv2 releases.
HPSV2_CONFIG = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
HPSV2_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP BPE tokenizer open_clip uses for ViT-H-14

# ImageReward v1.0: BLIP's "large" ViT (patch 16 at 224 px) and BLIP's med_config BERT.
IMAGEREWARD_CONFIG = {
    "vision": {"image_size": 224, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16},
    "text": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "vocab_size": 30524,  # bert-base-uncased plus BLIP's [DEC] and [ENC]
        "pad_token_id": 0,
        "encoder_width": 1024,
    },
}
IMAGEREWARD_TOKENIZER = "google-bert/bert-base-uncased"
# Keys a config= JSON must give (the released configs above show their meaning).
HPSV2_REQUIRED = {"embed_dim": (), "vision_cfg": ("image_size", "layers", "width", "patch_size"),
                  "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers")}
IMAGEREWARD_REQUIRED = {"vision": ("image_size", "patch_size", "width", "layers", "heads"),
                        "text": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                 "max_position_embeddings", "vocab_size", "encoder_width")}
IMAGEREWARD_MAX_TOKENS = 35
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# ImageReward's MLP head: Linear layers to these widths, no activations, a dropout after each of the first three.
# So the Linear layers sit at positions 0, 2, 4, 6 and 7 of its nn.Sequential, as the checkpoint's keys say.
IMAGEREWARD_HEAD_WIDTHS = (1024, 128, 64, 16, 1)
IMAGEREWARD_HEAD_DROPOUTS = 3


def read_model_config(path: str | None, default: dict, required: dict, what: str) -> dict:
    """The architecture config: the released model's by default, or a JSON file in the same layout."""
    if path is None:
        return default
    with open(os.path.expanduser(path), encoding="utf-8") as handle:
        config = json.load(handle)
    missing = [section for section in required if section not in config]
    missing += [f"{section}.{key}" for section, keys in required.items() if isinstance(config.get(section), dict)
                for key in keys if key not in config[section]]
    if missing:
        raise ValueError(f"{what} config {path!r}: missing {', '.join(missing)}; see the released config in "
                         "actors/raters/reward_models.py for the layout")
    return config


def load_tokenizer(tokenizer_class, location: str, rater: str):
    """A tokenizer from a local folder or the local Hugging Face cache; never downloaded at run time."""
    try:
        return tokenizer_class.from_pretrained(os.path.expanduser(location), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{rater}: could not load its tokenizer from {location!r} ({err}); fetch it once "
            f"(`hf download {location}` on every rater node) or pass tokenizer=PATH to a local folder"
        ) from err


def without_random_init():
    """Skip transformers' random initialisation: the checkpoint overwrites every weight (saves ~11 s on ViT-H)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older or newer transformers without it: initialise, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint: safetensors, or a torch file holding only tensors (optionally in `state_dict`)."""
    local = os.path.expanduser(path)
    if local.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(local)
    try:
        # weights_only: a restricted unpickler that builds tensors and plain containers and never runs code.
        loaded = torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"checkpoint {path!r} holds more than tensors, and seedsift never unpickles arbitrary objects ({err}); "
            "re-save its state_dict with torch.save or as .safetensors"
        ) from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]  # HPSv2's training checkpoints keep the weights under "state_dict"
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(f"checkpoint {path!r}: expected a dict of tensors (a state_dict), got {type(loaded).__name__}")
    # Checkpoints saved from a DistributedDataParallel wrapper prefix every key with "module.".
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def load_exactly(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str) -> None:
    """Load `weights` into `model`, raising if any weight is missing, unexpected or of another shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    reshaped = sorted(key for key in set(expected) & set(weights) if expected[key].shape != weights[key].shape)
    if missing or unexpected or reshaped:
        details = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", reshaped))
            if keys
        )
        raise ValueError(f"checkpoint {path!r} does not fit this model ({details}); check the file and config=")
    model.load_state_dict(weights, strict=True)


def build_from_checkpoint(build: Callable[[], torch.nn.Module], rename: Callable[[dict], dict], checkpoint: str,
                          device: torch.device) -> torch.nn.Module:
    """Build a model without random init, load a checkpoint into it (renamed to its layout), move it to `device`.

    Weights stay float32 on every device, as both reference implementations keep them.
    """
    with without_random_init():
        model = build()
    load_exactly(model, rename(load_state_dict(checkpoint)), checkpoint)
    return model.to(device).eval()


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """CLIP mean/std normalisation of (B, 3, H, W) values in 0..1."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def resize_longer_side_and_pad(images: np.ndarray, size: int) -> torch.Tensor:
    """HPSv2's evaluation transform: longer side to `size` (bicubic, antialiased), centred zero padding, normalise."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        pixels = F.interpolate(pixels, size=(new_height, new_width), mode="bicubic", align_corners=False,
                               antialias=True)
        pad_height, pad_width = size - new_height, size - new_width
        pixels = F.pad(pixels, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2,
                                pad_height - pad_height // 2))
    return normalise(pixels)


def resize_shorter_side_and_crop(images: np.ndarray, size: int) -> torch.Tensor:
    """ImageReward's transform: shorter side to `size` (PIL bicubic), centre crop to a square, normalise."""
    crops = []
    for image in images:
        picture = Image.fromarray(image)
        width, height = picture.size
        short, long = min(width, height), max(width, height)
        if short != size:
            long = int(size * long / short)
            picture = picture.resize((size, long) if width <= height else (long, size), Image.BICUBIC)
        width, height = picture.size
        # Rounded half to even, as torchvision's CenterCrop does.
        top, left = round((height - size) / 2.0), round((width - size) / 2.0)
        crops.append(np.asarray(picture.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
    return normalise(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2))


# --- HPSv2 ----------------------------------------------------------------------------------------------------


def open_clip_clean(text: str) -> str:
    """open_clip's text clean-up before its BPE: ftfy.fix_text, HTML unescaped twice, whitespace runs to one space.

    transformers' CLIPTokenizer only normalises Unicode (NFC) and whitespace, so curly quotes, full-width letters
    or ligatures would otherwise give other tokens than the ones HPSv2 was trained on.
    """
    import ftfy

    return re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text)))).strip()


def open_clip_token_ids(tokenizer, prompts: list[str], context_length: int) -> torch.Tensor:
    """Token ids as open_clip makes them: start, BPE of the cleaned text, end (kept when cut), then zeros.

    The BPE runs through the tokenizer's own normaliser, pre-tokeniser and model but not its added-token table:
    CLIP tokenizers exported from open_clip register "!" as the pad token, which would split every "!" in a
    prompt out of its word.
    """
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    bpe = Tokenizer(backend.model)
    bpe.normalizer, bpe.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    ids = torch.zeros((len(prompts), context_length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        body = bpe.encode(open_clip_clean(prompt), add_special_tokens=False).ids[: context_length - 2]
        tokens = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids


def hpsv2_clip_config(config: dict, eos_token_id: int):
    """transformers CLIPConfig with the shapes of an open_clip model config (exact GELU, pre-norm, eps 1e-5)."""
    from transformers import CLIPConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    vision_width, text_width = vision["width"], text["width"]
    return CLIPConfig(
        projection_dim=config["embed_dim"],
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision_width // vision.get("head_width", 64),
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        text_config={
            "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text["layers"],
            "num_attention_heads": text["heads"],
            "max_position_embeddings": text["context_length"],
            "vocab_size": text["vocab_size"],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            # Pool at the end-of-text token, as open_clip does (its id is the vocabulary's largest).
            "eos_token_id": eos_token_id,
        },
    )


def open_clip_to_transformers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state_dict to transformers' CLIPModel layout (fused attention projections split)."""
    renamed: dict[str, torch.Tensor] = {}
    fixed = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    norms = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
             "ln_final": "text_model.final_layer_norm"}
    block_parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
    for key, value in weights.items():
        if key in fixed:
            renamed[fixed[key]] = value
        elif key in ("visual.proj", "text_projection"):
            # open_clip multiplies x @ proj; transformers' Linear stores the transpose.
            target = "visual_projection.weight" if key == "visual.proj" else "text_projection.weight"
            renamed[target] = value.t().contiguous()
        elif key.rsplit(".", 1)[0] in norms:
            module, leaf = key.rsplit(".", 1)
            renamed[f"{norms[module]}.{leaf}"] = value
        elif ".resblocks." in key:
            tower, rest = key.split(".resblocks.")
            layer, part = rest.split(".", 1)
            prefix = f"{'vision_model' if tower.startswith('visual') else 'text_model'}.encoder.layers.{layer}"
            module, leaf = part.rsplit(".", 1)
            if module == "attn" and leaf.startswith("in_proj_"):
                # One (3W, W) projection in open_clip; separate q, k and v projections in transformers.
                kind = leaf.removeprefix("in_proj_")
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    renamed[f"{prefix}.self_attn.{name}.{kind}"] = chunk.contiguous()
            elif module in block_parts:
                renamed[f"{prefix}.{block_parts[module]}.{leaf}"] = value
            else:
                renamed[key] = value  # left as is, so load_exactly names it
        else:
            renamed[key] = value
    return renamed


class HPSv2Rater:
    """Human Preference Score v2: cosine of a preference-tuned ViT-H-14 CLIP's image and text embeddings."""

    def __init__(self, name: str, checkpoint: str, tokenizer: str | None = None, config: str | None = None) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        self.name = name
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        architecture = read_model_config(config, HPSV2_CONFIG, HPSV2_REQUIRED, "hpsv2")
        self.tokenizer = load_tokenizer(CLIPTokenizer, tokenizer or HPSV2_TOKENIZER, name)
        clip_config = hpsv2_clip_config(architecture, self.tokenizer.eos_token_id)
        # Scored under autocast on a GPU: what hpsv2 does (precision="amp").
        self.model = build_from_checkpoint(lambda: CLIPModel(clip_config), open_clip_to_transformers, checkpoint,
                                           self.device)
        self.image_size = int(architecture["vision_cfg"]["image_size"])
        self.context_length = int(architecture["text_cfg"]["context_length"])

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from actors.raters.images import check_image_batch

        check_image_batch(images, prompts)
        input_ids = open_clip_token_ids(self.tokenizer, prompts, self.context_length)
        pixels = resize_longer_side_and_pad(images, self.image_size)
        autocast = torch.autocast("cuda") if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device))
            # No attention mask, as in open_clip: the causal mask keeps the zero padding out of the end token.
            text_embeds = self.model.get_text_features(input_ids=input_ids.to(self.device))
            cosine = F.cosine_similarity(_as_tensor(image_embeds).float(), _as_tensor(text_embeds).float(), dim=-1)
        return cosine.cpu().numpy().astype(np.float32)


def _as_tensor(features) -> torch.Tensor:
    """get_*_features return a tensor in transformers 4 and an output object (pooler_output) in transformers 5."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


# --- ImageReward ----------------------------------------------------------------------------------------------


class ImageRewardModel(torch.nn.Module):
    """BLIP image encoder, BERT text encoder cross-attending to it, and ImageReward's MLP head on the first token."""

    def __init__(self, config: dict) -> None:
        from transformers import BlipTextConfig, BlipVisionConfig
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        vision, text = config["vision"], config["text"]
        self.visual_encoder = BlipVisionModel(BlipVisionConfig(
            hidden_size=vision["width"],
            intermediate_size=4 * vision["width"],
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["heads"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_act="gelu",
            layer_norm_eps=1e-6,  # BLIP's ViT, unlike transformers' default of 1e-5
        ))
        self.text_encoder = BlipTextModel(BlipTextConfig(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            encoder_hidden_size=text["encoder_width"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            max_position_embeddings=text["max_position_embeddings"],
            hidden_act=text.get("hidden_act", "gelu"),
            layer_norm_eps=text.get("layer_norm_eps", 1e-12),
            pad_token_id=text.get("pad_token_id", 0),
            bos_token_id=None,
            sep_token_id=None,
            # transformers builds the cross-attention layers only for a decoder config; forward() below still
            # runs the self-attention bidirectionally (is_decoder=False), as ImageReward's encoder does.
            is_decoder=True,
            use_cache=False,
        ), add_pooling_layer=False)
        widths = (text["hidden_size"], *IMAGEREWARD_HEAD_WIDTHS)
        layers: list[torch.nn.Module] = []
        for index, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
            layers.append(torch.nn.Linear(width_in, width_out))
            if index < IMAGEREWARD_HEAD_DROPOUTS:
                layers.append(torch.nn.Dropout(0.0))  # no-ops at inference; they keep the published numbering
        self.head = torch.nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        patches = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=patches,
            encoder_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long, device=patches.device),
            is_decoder=False,
        ).last_hidden_state
        reward = self.head(text[:, 0, :])
        return (reward.squeeze(-1).float() - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def blip_to_image_reward(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ImageReward.pt state_dict (BLIP's timm-style ViT naming) to ImageRewardModel's layout.

    BLIP's contrastive projections (vision_proj, text_proj) are not used for the reward and are dropped.
    """
    vision_parts = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                    "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    vision_fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                    "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.startswith(("blip.vision_proj.", "blip.text_proj.")) or key.endswith("position_ids"):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in vision_fixed:
                renamed[f"visual_encoder.{vision_fixed[rest]}"] = value
                continue
            if rest.startswith("blocks."):
                _, layer, part = rest.split(".", 2)
                module, leaf = part.rsplit(".", 1)
                if module in vision_parts:
                    renamed[f"visual_encoder.encoder.layers.{layer}.{vision_parts[module]}.{leaf}"] = value
                    continue
            renamed[key] = value
        elif key.startswith("blip.text_encoder."):
            # transformers' BLIP text model is a port of BLIP's med.py and keeps its parameter names.
            renamed["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            renamed["head." + key.removeprefix("mlp.layers.")] = value
        else:
            renamed[key] = value
    return renamed


class ImageRewardRater:
    """ImageReward: a BLIP-based reward model trained on expert comparisons of text-to-image outputs."""

    def __init__(self, name: str, checkpoint: str, tokenizer: str | None = None, config: str | None = None) -> None:
        from transformers import BertTokenizer

        self.name = name
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        architecture = read_model_config(config, IMAGEREWARD_CONFIG, IMAGEREWARD_REQUIRED, "imagereward")
        self.tokenizer = load_tokenizer(BertTokenizer, tokenizer or IMAGEREWARD_TOKENIZER, name)
        self.model = build_from_checkpoint(lambda: ImageRewardModel(architecture), blip_to_image_reward,
                                           checkpoint, self.device)
        self.image_size = int(architecture["vision"]["image_size"])

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from actors.raters.images import check_image_batch

        check_image_batch(images, prompts)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt")
        pixels = resize_shorter_side_and_crop(images, self.image_size)
        with torch.inference_mode():
            rewards = self.model(pixels.to(self.device), tokens["input_ids"].to(self.device),
                                 tokens["attention_mask"].to(self.device))
        return rewards.cpu().numpy().astype(np.float32)
