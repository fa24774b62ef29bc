"""Make the HPSv2 and ImageReward reference fixtures in this folder with the two packages' OWN scoring code.

What it writes (next to this file, or into --out DIR):
  hps_tiny_config.json          HPS_TINY_CONFIG from tests/helpers_raters.py (an open_clip model config)
  hps_tiny.pt                   tiny random HPSv2 checkpoint, real HPS_v2*_compressed.pt layout:
                                {'state_dict': ..., 'iterations': 1, 'name': 'tiny'}
  imagereward_tiny_config.json  imagereward_tiny_config() from tests/helpers_raters.py
  imagereward_tiny.pt           tiny random ImageReward checkpoint, real ImageReward.pt layout (a plain state_dict)
  expected.json                 the scores the packages give for rating_cases(), one prompt per image

Scores come from:
  HPSv2:       hpsv2.img_score.score(pil_image, prompt, cp=hps_tiny.pt), unmodified, in hpsv2 1.2.0. Only three
               module globals are redirected: create_model_and_transforms builds the tiny registered config instead
               of downloading ViT-H-14/laion2B (every other argument is the one img_score passes, except
               precision='fp32' instead of 'amp', which is the same thing on CPU), get_tokenizer returns an
               open_clip-format tokenizer over the tiny CLIP vocabulary, and device is 'cpu'. score() itself
               loads the checkpoint with torch.load and model.load_state_dict(strict=True), applies
               preprocess_val, runs model(image, text) and takes diag(image_features @ text_features.T).
  ImageReward: ImageReward.utils.load(name=imagereward_tiny.pt, med_config=...), which torch.loads the plain
               state_dict and load_state_dict(strict=False)s it into the package's ImageReward class, then
               the package's ImageReward.score(prompt, pil_image) per image. The BLIP ViT is built by the
               package's own vit.VisionTransformer with the tiny sizes (create_vit only knows 'base'/'large'),
               the MLP head is the package's MLP class with input size = the tiny text width (the package
               hard-codes MLP(768)), and the BLIP tokenizer is tests.helpers_raters.tiny_bert_tokenizer().

Environment it was run in (Linux x86_64, no GPU, offline):
  Python 3.11.7; torch 2.13.0+cpu; transformers 5.23.0; torchvision 0.28.0; timm 0.6.13; fairscale 0.4.13;
  hpsv2 1.2.0; image-reward 1.5; open_clip_torch 3.3.0 (only as the source of the BPE file); numpy, pillow.

  python3.11 -m venv venv && . venv/bin/activate
  pip install torch==2.13.0                       # the CPU build was used; any recent torch 2.x should do
  pip install transformers==5.23.0 numpy pillow regex ftfy requests huggingface_hub clint tqdm
  pip install --no-deps torchvision==0.28.0 timm==0.6.13 fairscale==0.4.13
  pip install --no-deps hpsv2==1.2.0 image-reward==1.5 open_clip_torch==3.3.0
  # hpsv2's wheel lacks the BPE vocabulary its vendored open_clip loads at import time; copy open_clip's:
  cp venv/lib/python3.11/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz \
     venv/lib/python3.11/site-packages/hpsv2/src/open_clip/
  python tests/data/raters/make_reference.py            # from the repository root

Why --no-deps: hpsv2 pins pytest==7.2.0, protobuf<4 and pulls webdataset/pandas/pyarrow; image-reward pulls
diffusers, accelerate and datasets (only for its ReFL trainer); none is used for scoring. timm 0.6.13 and
fairscale 0.4.13 are the versions image-reward pins (its BLIP vit.py imports from both).

Shims applied in this script (none changes the arithmetic of scoring):
  * torchvision: the PyPI torchvision 0.28 wheel is built against CUDA torch; on CPU-only torch its C
    extension fails to load and torchvision then dies at import defining fake kernels for the undefined ops
    torchvision::nms/qnms. Defining those two op schemas first lets its pure-Python transforms import (hpsv2
    and ImageReward use only torchvision.transforms). Unneeded with a torchvision matching the torch build.
  * image-reward 1.5 on transformers 5: ImageReward/__init__ imports ReFL (diffusers etc.) and models that do
    `import clip`, so the package is registered without running its __init__ and `clip` is stubbed;
    med.py's helpers that moved from transformers.modeling_utils to pytorch_utils are re-exported;
    PreTrainedModel.get_head_mask / invert_attention_mask (removed in v5) are re-added with their v4
    behaviour; med.BertPreTrainedModel.init_weights is routed through post_init() as v5 requires;
    BLIP's init_tokenizer (downloads bert-base-uncased) returns the tiny tokenizer instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import math
import os
import sys
import tempfile
import types
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
HPS_NAME = "hps_tiny_config"  # open_clip names a registered config after its file


# ----------------------------------------------------------------------------------------------------------- shims
def install_torchvision_shim() -> str:
    try:
        import torchvision  # noqa: F401

        return "native"
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]
    global _TORCHVISION_LIB
    _TORCHVISION_LIB = torch.library.Library("torchvision", "FRAGMENT")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401

    return "shimmed"


def install_imagereward_shims(make_tokenizer) -> None:
    sys.modules.setdefault("clip", types.ModuleType("clip"))
    if "ImageReward" not in sys.modules:
        spec = importlib.util.find_spec("ImageReward")
        package = types.ModuleType("ImageReward")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["ImageReward"] = package
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
            raise NotImplementedError("head pruning is not supported")

        mu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices
    base = mu.PreTrainedModel
    if not hasattr(base, "get_head_mask"):
        def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
            assert head_mask is None, "head_mask is not supported"
            return [None] * num_hidden_layers

        base.get_head_mask = get_head_mask
    if not hasattr(base, "invert_attention_mask"):
        def invert_attention_mask(self, encoder_attention_mask):
            if encoder_attention_mask.dim() == 3:
                extended = encoder_attention_mask[:, None, :, :]
            else:
                extended = encoder_attention_mask[:, None, None, :]
            extended = extended.to(dtype=self.dtype)
            return (1.0 - extended) * torch.finfo(self.dtype).min

        base.invert_attention_mask = invert_attention_mask
    import ImageReward.models.BLIP.med as med

    if "all_tied_weights_keys" in base.post_init.__code__.co_names:
        original_init_weights = base.init_weights

        def init_weights(self):
            if "all_tied_weights_keys" not in self.__dict__:
                return self.post_init()
            return original_init_weights(self)

        med.BertPreTrainedModel.init_weights = init_weights
    import ImageReward.models.BLIP.blip as blip
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain

    def init_tokenizer():
        tokenizer = make_tokenizer()  # already has [DEC] as bos and [ENC] as an extra, like BLIP's init_tokenizer
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
        return tokenizer

    blip.init_tokenizer = init_tokenizer
    blip_pretrain.init_tokenizer = init_tokenizer


# ----------------------------------------------------------------------------------------------------- shared bits
def perturb_(model: torch.nn.Module, seed: int, overrides: dict | None = None, fan_in_linear: bool = False) -> None:
    """Move every floating parameter off its (often exactly 0 or 1) init with a fixed generator.

    LayerNorm weights become 1 + 0.1 N(0, 1); with fan_in_linear, every nn.Linear weight becomes
    N(0, 1) / sqrt(fan_in); `overrides` maps parameter names to setters; everything else gets + 0.02 N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    layer_norm_weights = {
        id(module.weight) for module in model.modules()
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None
    }
    linear_weights = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Linear)}
    overrides = overrides or {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not parameter.is_floating_point():
                continue
            noise = torch.randn(parameter.shape, generator=generator)
            if name in overrides:
                overrides[name](parameter)
            elif id(parameter) in layer_norm_weights:
                parameter.copy_(1.0 + 0.1 * noise)
            elif fan_in_linear and id(parameter) in linear_weights:
                parameter.copy_(noise / math.sqrt(parameter.shape[1]))
            else:
                parameter.add_(0.02 * noise)


def pil_images(batch: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(np.ascontiguousarray(image)).convert("RGB") for image in batch]


def load_helpers():
    sys.path.insert(0, str(REPO))
    from tests import helpers_clip, helpers_raters

    return helpers_clip, helpers_raters


# ---------------------------------------------------------------------------------------------------------- HPSv2
def open_clip_format_tokenizer(tiny_clip_tokenizer):
    """hpsv2.src.open_clip.tokenizer.tokenize with the tiny CLIP vocabulary: [sot] + ids + [eot], cut to
    context_length keeping eot last, zero-padded."""
    tokenizer = tiny_clip_tokenizer()
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id

    def tokenize(texts, context_length: int = 77) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        all_tokens = [[sot] + tokenizer(text, add_special_tokens=False).input_ids + [eot] for text in texts]
        result = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
        for i, tokens in enumerate(all_tokens):
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = eot
            result[i, : len(tokens)] = torch.tensor(tokens)
        return result

    return tokenize


def make_hps(out: Path, helpers_clip, helpers_raters) -> dict[str, list[float]]:
    import hpsv2.img_score as img_score
    import hpsv2.src.open_clip as vendored

    config_path = out / "hps_tiny_config.json"
    config_path.write_text(json.dumps(helpers_raters.HPS_TINY_CONFIG, indent=2) + "\n")
    vendored.add_model_config(config_path)  # registered under the file's stem, HPS_NAME
    assert vendored.get_model_config(HPS_NAME) == helpers_raters.HPS_TINY_CONFIG

    original_create = img_score.create_model_and_transforms

    def create_model_and_transforms(model_name, pretrained, **kwargs):
        # img_score.initialize_model asks for ('ViT-H-14', 'laion2B-s32B-b79K', precision='amp', ...): same
        # arguments, tiny config, no pretrained download; 'amp' only differs from 'fp32' under CUDA autocast.
        kwargs["precision"] = "fp32"
        kwargs["device"] = "cpu"
        return original_create(HPS_NAME, None, **kwargs)

    img_score.create_model_and_transforms = create_model_and_transforms
    tokenize = open_clip_format_tokenizer(helpers_clip.tiny_clip_tokenizer)
    img_score.get_tokenizer = lambda name: tokenize
    img_score.device = "cpu"
    img_score.model_dict.clear()

    torch.manual_seed(0)
    model, _, preprocess_val = create_model_and_transforms(
        "ViT-H-14", "laion2B-s32B-b79K", precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)

    def set_logit_scale(parameter):
        parameter.fill_(math.log(100.0))

    perturb_(model, seed=1, overrides={"logit_scale": set_logit_scale})
    checkpoint = out / "hps_tiny.pt"
    torch.save({"state_dict": model.state_dict(), "iterations": 1, "name": "tiny"}, checkpoint)

    scores: dict[str, list[float]] = {}
    model.eval()
    for case, (images, prompts) in helpers_raters.rating_cases().items():
        assert len(images) == len(prompts)
        values = []
        for image, prompt in zip(pil_images(images), prompts):
            (value,) = img_score.score(image, prompt, cp=str(checkpoint))  # the package's own scorer
            values.append(float(value))
        # Cross-check: the freshly built model, batched, gives the same numbers.
        with torch.no_grad():
            batch = torch.stack([preprocess_val(image) for image in pil_images(images)])
            output = model(batch, tokenize(prompts))
            direct = torch.diagonal(output["image_features"] @ output["text_features"].T)
        assert np.allclose(direct.numpy(), values, atol=1e-6), (direct, values)
        scores[case] = values
    return scores


# ---------------------------------------------------------------------------------------------------- ImageReward
def make_imagereward(out: Path, helpers_raters) -> dict[str, list[float]]:
    install_imagereward_shims(helpers_raters.tiny_bert_tokenizer)
    import ImageReward.ImageReward as ir_module
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    import ImageReward.utils as ir_utils
    from ImageReward.models.BLIP.vit import VisionTransformer

    config = helpers_raters.imagereward_tiny_config()
    config_path = out / "imagereward_tiny_config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    vision, text = config["vision"], config["text"]
    assert text["encoder_width"] == vision["width"]

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        assert image_size == vision["image_size"]
        encoder = VisionTransformer(
            img_size=vision["image_size"], patch_size=vision["patch_size"], embed_dim=vision["width"],
            depth=vision["layers"], num_heads=vision["heads"], use_grad_checkpointing=use_grad_checkpointing,
            ckpt_layer=ckpt_layer, drop_path_rate=drop_path_rate)
        return encoder, vision["width"]

    blip_pretrain.create_vit = create_vit
    # ImageReward.__init__ does `self.mlp = MLP(768)`; build the package's MLP at the tiny text width instead,
    # so that the package's own utils.load can rebuild this model.
    package_mlp = ir_module.MLP
    ir_module.MLP = lambda input_size: package_mlp(text["hidden_size"])

    with tempfile.TemporaryDirectory() as folder:
        med_config = Path(folder) / "med_config.json"
        med_config.write_text(json.dumps(text, indent=2))

        torch.manual_seed(0)
        model = ir_module.ImageReward(med_config=str(med_config), device="cpu")
        assert isinstance(model.mlp, package_mlp) and model.mlp.input_size == text["hidden_size"]

        # BERT's init (std 0.02) leaves the [CLS] output almost independent of the prompt and the image, and the
        # package's MLP init (std 1/(n+1), zero bias) makes it near constant: with every Linear weight (BERT, ViT
        # and head) at N(0, 1/fan_in) the score depends strongly on the image, the prompt and the attention mask.
        perturb_(model, seed=2, fan_in_linear=True)
        checkpoint = out / "imagereward_tiny.pt"
        torch.save(model.state_dict(), checkpoint)

        reloaded = ir_utils.load(name=str(checkpoint), device="cpu", med_config=str(med_config))
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        result = reloaded.load_state_dict(state, strict=False)  # what utils.load did; now look at the result
        assert not result.missing_keys and not result.unexpected_keys, result
        for key, value in model.state_dict().items():
            assert torch.equal(reloaded.state_dict()[key], value), key

    ir_module.MLP = package_mlp
    reloaded.eval()
    scores: dict[str, list[float]] = {}
    with torch.no_grad():
        for case, (images, prompts) in helpers_raters.rating_cases().items():
            scores[case] = [float(reloaded.score(prompt, image)) for image, prompt in zip(pil_images(images), prompts)]
    return scores


# ------------------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: this folder)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("torchvision:", install_torchvision_shim())
    helpers_clip, helpers_raters = load_helpers()

    hps = make_hps(args.out, helpers_clip, helpers_raters)
    imagereward = make_imagereward(args.out, helpers_raters)

    import hpsv2.src.open_clip.version as vendored_version
    import transformers

    expected = {
        "hpsv2": hps,
        "imagereward": imagereward,
        "produced_by": {
            "hpsv2": md.version("hpsv2"),
            "image-reward": md.version("image-reward"),
            "open_clip (vendored in hpsv2)": vendored_version.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torchvision": md.version("torchvision"),
            "timm": md.version("timm"),
            "fairscale": md.version("fairscale"),
            "pillow": md.version("pillow"),
            "numpy": np.__version__,
        },
    }
    (args.out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(json.dumps(expected, indent=2))


if __name__ == "__main__":
    main()
