"""Raters: each scores a rendered image for its prompt (higher is better), chosen by a spec string.

The rating stage (actors/stages/rater.py), or a generator for a pixel rater, reads `image`, `prompt`, `status`
from the row and adds `score` (rate_batch).

Rater specs (what a job config carries, and what manifests record as the rater's `name`):

    colorfulness                      default; no weights
    sharpness                         no weights
    shapes                            GenEval-like fact checker for shapes-grammar prompts and embedded:shapes
                                      renders (actors/testbed/rater.py); no weights
    clip:PATH_OR_ID[,processor=P]     CLIP score from a CLIPModel folder or hub id
    pickscore:PATH_OR_ID[,processor=P]
                                      PickScore (a CLIP model, scored the same way); its processor lives in a
                                      separate repo, e.g. processor=laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    hpsv2:FILE[,tokenizer=T][,config=JSON]
                                      HPSv2 / v2.1 from its released checkpoint (HPS_v2.1_compressed.pt);
                                      tokenizer defaults to laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    imagereward:FILE[,tokenizer=T][,config=JSON]
                                      ImageReward from ImageReward.pt; tokenizer defaults to
                                      google-bert/bert-base-uncased

The text after `NAME:` is the model path, then optional `key=value` options separated by commas, so a model path
cannot contain a comma. Paths are local folders or Hugging Face hub ids (owner/name); nothing is downloaded at run
time, so a hub id only loads if it is already in the local Hugging Face cache. HPSv2 and ImageReward checkpoints
are local files; `config=` names a JSON architecture for variants of them (see actors/raters/reward_models.py).

colorfulness and sharpness are stand-ins so the pipeline runs end to end without a model; neither looks at the
prompt, and neither measures what people prefer:

- colorfulness: Hasler & Suesstrunk (2003) on 0..255 values: rg = R - G, yb = 0.5 (R + G) - B,
  M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2). It correlates with how colourful people
  judge a photo, so it rewards saturated, garish images whatever the prompt asked for.
- sharpness: variance of the 4-neighbour discrete Laplacian of the BT.601 luma (0.299 R + 0.587 G + 0.114 B).
  A focus measure: it rewards high-frequency content, including noise and diffusion artefacts.

shapes does read the prompt: it finds flat objects by colour and shape and returns the share of the prompt's facts
(object present, count, relation) that hold, plus a small cleanliness term; only for shapes-grammar prompts
(actors/testbed/world.py), validated on the procedural scenes (docs/shapes.md).

CLIP and PickScore compute score = logit_scale.exp() * cosine(image_embedding, text_embedding), as PickScore's
reference code does; PickScore is a CLIP model fine-tuned on human preferences, so it is the real preference metric.
HPSv2 and ImageReward are rebuilt from their checkpoints without their packages (actors/raters/reward_models.py).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from actors.models.paths import looks_like_local_path

DEFAULT_RATER_SPEC = "colorfulness"
RATER_NAMES = ("colorfulness", "sharpness", "shapes", "clip", "pickscore", "hpsv2", "imagereward")
# Raters that read pixels with numpy: no model and no torch, microseconds an image. A generator rates its own renders
# with them; an actor of their own would cost a process start (a second of CPU) and a hop for that.
PIXEL_RATERS = ("colorfulness", "sharpness", "shapes")


def is_pixel_rater(spec: str) -> bool:
    return parse_rater_spec(spec).name in PIXEL_RATERS

# Options each rater accepts after its path; raters missing here take no path and no options.
RATER_OPTIONS = {
    "clip": ("processor",),
    "pickscore": ("processor",),
    "hpsv2": ("tokenizer", "config"),
    "imagereward": ("tokenizer", "config"),
}
# Raters whose path is a CLIPModel folder or hub id; the others with options take a checkpoint file.
CLIP_RATERS = ("clip", "pickscore")
# Where each checkpoint rater's weights are published, for error messages.
CHECKPOINT_SOURCES = {
    "hpsv2": "HPS_v2.1_compressed.pt from the xswu/HPSv2 hub repo",
    "imagereward": "ImageReward.pt from the THUDM/ImageReward hub repo",
}


class Rater(Protocol):
    """Anything that scores a batch of images for their prompts; `name` is the spec it was built from."""

    name: str

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class RaterSpec:
    """A parsed rater spec: `name`, optional model `path`, and `key=value` options."""

    name: str
    path: str | None = None
    options: dict[str, str] = field(default_factory=dict)


def parse_rater_spec(spec: str) -> RaterSpec:
    """Split `NAME[:PATH[,key=value...]]` into its parts, checking the name and which parts it allows."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"rater spec {spec!r}: empty; use one of {', '.join(RATER_NAMES)}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in RATER_NAMES:
        raise ValueError(f"rater spec {spec!r}: unknown rater {name!r}; known raters: {', '.join(RATER_NAMES)}")
    path, *option_parts = [part.strip() for part in rest.split(",")] if rest else [None]
    options = {}
    for part in option_parts:
        key, equals, value = part.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise ValueError(f"rater spec {spec!r}: option {part!r} is not key=value")
        options[key.strip()] = value.strip()

    if name in RATER_OPTIONS:
        if not path:
            what = "PATH_OR_HUB_ID" if name in CLIP_RATERS else "CHECKPOINT_FILE"
            raise ValueError(f"rater spec {spec!r}: {name} needs a model; write {name}:{what}")
        unknown = sorted(set(options) - set(RATER_OPTIONS[name]))
        if unknown:
            raise ValueError(
                f"rater spec {spec!r}: unknown option(s) {', '.join(unknown)}; {name} accepts: "
                f"{', '.join(RATER_OPTIONS[name])}"
            )
    elif path or options:
        raise ValueError(f"rater spec {spec!r}: {name} takes no path or options; write just {name!r}")
    return RaterSpec(name=name, path=path, options=options)


def validate_rater_spec(spec: str) -> None:
    """Fail fast, before any compute, if `spec` cannot give a rater; never loads a model. Raises ValueError."""
    parsed = parse_rater_spec(spec)
    if parsed.name in CLIP_RATERS:
        check_model_location(parsed.path, spec, what="model", needs_config=True)
        if "processor" in parsed.options:
            check_model_location(parsed.options["processor"], spec, what="processor", needs_config=False)
    elif parsed.name in CHECKPOINT_SOURCES:
        if parsed.name == "hpsv2" and importlib.util.find_spec("ftfy") is None:
            raise ValueError(f"rater spec {spec!r}: hpsv2 cleans prompts with ftfy, as open_clip does; "
                             "run `pip install ftfy` (or seedsift[raters])")
        check_checkpoint_file(parsed.path, spec, parsed.name)
        if "tokenizer" in parsed.options:
            check_model_location(parsed.options["tokenizer"], spec, what="tokenizer", needs_config=False)
        if "config" in parsed.options:
            check_local_file(parsed.options["config"], spec, what="config")


def make_rater(spec: str = DEFAULT_RATER_SPEC) -> Rater:
    """Build the rater a spec names (see the module docstring for the syntax); its `name` is `spec`."""
    validate_rater_spec(spec)
    parsed = parse_rater_spec(spec)
    name = spec.strip()
    if parsed.name in ("colorfulness", "sharpness"):
        from actors.raters.pixel import ColorfulnessRater, SharpnessRater

        return (ColorfulnessRater if parsed.name == "colorfulness" else SharpnessRater)(name)
    if parsed.name == "shapes":
        from actors.testbed.rater import ShapesRater

        return ShapesRater(name)
    if parsed.name in CHECKPOINT_SOURCES:
        from actors.raters.reward_models import HPSv2Rater, ImageRewardRater

        rater_class = HPSv2Rater if parsed.name == "hpsv2" else ImageRewardRater
        return rater_class(name, parsed.path, tokenizer=parsed.options.get("tokenizer"),
                           config=parsed.options.get("config"))
    from actors.raters.clip import ClipScoreRater  # lazy, as the others: torch and transformers load with a rater

    return ClipScoreRater(name, parsed.path, processor_path=parsed.options.get("processor"))


def check_local_file(path: str, spec: str, what: str) -> None:
    """`path` must be an existing local file (not a URL, not a folder)."""
    if "://" in path:
        raise ValueError(f"rater spec {spec!r}: {what} {path!r} is a remote URL; copy it to a local file first")
    if not os.path.isfile(os.path.expanduser(path)):
        raise ValueError(f"rater spec {spec!r}: {what} file {path!r} does not exist; check the path")


def check_checkpoint_file(path: str, spec: str, name: str) -> None:
    """A checkpoint rater's weights: an existing local file with a known suffix."""
    from actors.raters.reward_models import CHECKPOINT_SUFFIXES

    check_local_file(path, spec, what="checkpoint")
    if not path.endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"rater spec {spec!r}: checkpoint {path!r} is not a {', '.join(CHECKPOINT_SUFFIXES)} file; "
            f"{name} loads {CHECKPOINT_SOURCES[name]}"
        )


def check_model_location(path: str, spec: str, what: str, needs_config: bool) -> None:
    """A local-looking `path` must be an existing folder (with config.json for a model); hub ids pass unchecked."""
    if "://" in path:
        raise ValueError(
            f"rater spec {spec!r}: {what} {path!r} is a remote URL; copy it to a local folder and give that path"
        )
    local = os.path.expanduser(path)
    if not looks_like_local_path(path):
        return
    if not os.path.isdir(local):
        raise ValueError(f"rater spec {spec!r}: {what} folder {path!r} does not exist; check the path")
    if needs_config and not os.path.isfile(os.path.join(local, "config.json")):
        raise ValueError(
            f"rater spec {spec!r}: {what} folder {path!r} has no config.json; "
            f"point at a folder written by CLIPModel.save_pretrained"
        )


def rate_batch(rater: Rater, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with a float32 `score` column: NaN for rows not "ok" (placeholder images); if the rater raises, the
    batch's ok rows become status "failed" with the reason in `error`, so one bad batch never takes the job down.
    The rater stage's work, and a generator's when it rates its own renders (RenderPlan.rates_images)."""
    count = len(batch["status"])
    # Object arrays, because writing "failed" into a fixed-width "<U2" array of "ok" would truncate it.
    status = np.array([str(value) for value in batch["status"]], dtype=object)
    old_errors = batch.get("error", [""] * count)
    error = np.array(["" if value is None else str(value) for value in old_errors], dtype=object)
    scores = np.full(count, np.nan, dtype=np.float32)
    ok = status == "ok"
    if ok.any():
        try:
            images = batch["image"][ok]
            if images.dtype == object:
                # Ray Data gives ragged tensor columns as an object array of arrays.
                images = np.stack(list(images))
            prompts = [str(prompt) for prompt in batch["prompt"][ok]]
            ok_scores = np.asarray(rater.score(images, prompts), dtype=np.float32)
            if ok_scores.shape != (int(ok.sum()),):
                raise ValueError(f"returned scores of shape {ok_scores.shape}, expected ({int(ok.sum())},)")
            scores[ok] = ok_scores
        except Exception as err:  # noqa: BLE001 - any rater failure is recorded in the rows, not raised
            status[ok] = "failed"
            error[ok] = f"rater {rater.name}: {type(err).__name__}: {err}"
    result = dict(batch)
    result["score"] = scores
    result["status"] = status.astype(str)
    result["error"] = error.astype(str)
    return result
