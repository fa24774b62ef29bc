"""CLIP score and PickScore: logit_scale.exp() * cosine(image embedding, text embedding) from a CLIPModel folder.

PickScore is a CLIP model fine-tuned on human preferences, scored the same way as its reference code does.
"""

from __future__ import annotations

import os

import numpy as np

from actors.raters.images import check_image_batch


class ClipScoreRater:
    """CLIP score (logit_scale.exp() * cosine of image and text embeddings) from a CLIPModel; also PickScore."""

    def __init__(self, name: str, model_path: str, processor_path: str | None = None) -> None:
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.name = name
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 halves memory and time on a GPU; CPUs run fp16 slowly or not at all, so keep fp32 there.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model_location = os.path.expanduser(model_path)
        processor_location = os.path.expanduser(processor_path) if processor_path else model_location
        try:
            self.processor = CLIPProcessor.from_pretrained(processor_location, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"rater spec {name!r}: could not load a CLIP processor from {processor_location!r} ({err}); "
                f"give processor=PATH pointing at a folder with the tokenizer and image processor files"
            ) from err
        try:
            model = CLIPModel.from_pretrained(model_location, dtype=self.dtype, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"rater spec {name!r}: could not load a CLIPModel from {model_location!r} ({err}); "
                f"point at a local folder written by save_pretrained or a hub id already in the local cache"
            ) from err
        self.model = model.to(self.device).eval()
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        import torch

        check_image_batch(images, prompts)
        # Long prompts are cut at CLIP's context length rather than failing the batch.
        text_inputs = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        image_inputs = self.processor.image_processor(images=list(images), return_tensors="pt")
        with torch.inference_mode():
            outputs = self.model(
                input_ids=text_inputs["input_ids"].to(self.device),
                attention_mask=text_inputs["attention_mask"].to(self.device),
                pixel_values=image_inputs["pixel_values"].to(self.device, self.dtype),
            )
            # The model returns unit-norm embeddings, so the row-wise dot product is the cosine.
            cosine = (outputs.image_embeds * outputs.text_embeds).sum(dim=-1)
            scores = self.model.logit_scale.exp() * cosine
        return scores.float().cpu().numpy().astype(np.float32)
