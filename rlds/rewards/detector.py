"""Compositionality for real images: an open-vocabulary detector's confidence in each named object.

The paper's reward for a prompt "<object> <relation> <object>" is the mean, over the objects the
prompt names, of the detector's confidence that the image shows that object:

    r(x_0, c) = 1/k sum_i conf(o_i),   conf(o) = max over the detector's boxes of sigmoid(logit(box, o))

The detector is any OWL-family zero-shot model in transformers (OWLv2, OWL-ViT), from a hub id
(`google/owlv2-base-patch16-ensemble`) or a local folder. For the spatial relations ("left of",
"above", ...) an optional term weighs the relation on the two objects' best boxes:

    r = mean_i conf(o_i) * ((1 - w) + w * sigmoid(offset / scale))

where offset is how far the second object's box centre lies from the first's in the direction the
relation asks for (in image widths), w = `relation_weight` (0 by default: the paper's reward).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from rlds.rewards.base import ImageReward
from rlds.rewards.vision import load_vision_model, pixel_values, reward_device

log = logging.getLogger("rlds")

# Relations without a direction (the paper's) and with one: (dx, dy) the second object's centre
# should lie at, relative to the first's, in image coordinates (y grows downwards).
RELATIONS = ("next to", "near", "on side of", "beside", "and")
SPATIAL = {"to the left of": (1, 0), "on the left of": (1, 0), "left of": (1, 0),
           "to the right of": (-1, 0), "on the right of": (-1, 0), "right of": (-1, 0),
           "above": (0, 1), "on top of": (0, 1), "below": (0, -1), "under": (0, -1)}
_ARTICLE = re.compile(r"^(a photo of |a picture of |an image of )?(an? |the |some )?")


@dataclass(frozen=True)
class ObjectPrompt:
    objects: tuple[str, ...]
    relation: Optional[str] = None


def parse_objects(prompt: str) -> ObjectPrompt:
    """'a cat to the left of a dog' -> (cat, dog), 'to the left of'; 'a red car' -> (red car,).
    The longest relation phrase that splits the prompt in two wins."""
    text = prompt.strip().lower().rstrip(".")
    for rel in sorted(RELATIONS + tuple(SPATIAL), key=len, reverse=True):
        left, sep, right = text.partition(f" {rel} ")
        if sep and left and right:
            return ObjectPrompt((_noun(left), _noun(right)), rel)
    return ObjectPrompt((_noun(text),) if _noun(text) else ())


def _noun(phrase: str) -> str:
    return _ARTICLE.sub("", phrase.strip()).strip()


class DetectorComposition(ImageReward):
    """`detector_composition`: the paper's compositionality reward with an OWL-family detector.

    args: model (hub id or folder), device (auto | cpu | cuda), batch_size (images per forward),
    query (the text each object is asked as), relation_weight and relation_scale (above).
    An image whose prompt names no object, or an object too long for the detector's text encoder,
    scores NaN: the replay store drops and counts it (`drops/nan_reward`), and the prompt is logged."""

    def __init__(self, model: str = "google/owlv2-base-patch16-ensemble", device: str = "auto",
                 batch_size: int = 8, query: str = "a photo of a {}", relation_weight: float = 0.0,
                 relation_scale: float = 0.05):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if not 0.0 <= relation_weight <= 1.0:
            raise ValueError(f"relation_weight must be in [0, 1]; got {relation_weight}")
        self.device = reward_device(device)
        self.model, self.processor = load_vision_model(AutoModelForZeroShotObjectDetection, AutoProcessor,
                                                     model, "detector_composition")
        if self.model.config.model_type not in ("owlv2", "owlvit"):
            raise ValueError(f"detector_composition: {model} is a {self.model.config.model_type!r} model; "
                             "it takes an OWL-family detector (owlv2, owlvit)")
        self.model.to(self.device)
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.batch_size, self.query = batch_size, query
        self.relation_weight, self.relation_scale = relation_weight, relation_scale
        self.rejected: set[str] = set()
        self.fits: dict[str, bool] = {}  # object -> whether its query fits the text encoder

    def _tokens(self, texts: list[str]) -> dict:
        return self.processor.tokenizer(texts, padding="max_length", max_length=self.max_tokens,
                                        return_tensors="pt").to(self.device)

    def _fits(self, obj: str) -> bool:
        if obj not in self.fits:
            self.fits[obj] = len(self.processor.tokenizer(self.query.format(obj)).input_ids) <= self.max_tokens
        return self.fits[obj]

    @torch.no_grad()
    def confidences(self, images: np.ndarray, parsed: list[ObjectPrompt]) -> tuple[np.ndarray, np.ndarray]:
        """Per image and named object (padded to the batch's most objects): the best box's confidence
        [B, Q] and its centre [B, Q, 2], in fractions of the image."""
        q = max(len(p.objects) for p in parsed)
        texts = [self.query.format(p.objects[min(j, len(p.objects) - 1)]) for p in parsed for j in range(q)]
        tokens = self._tokens(texts)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         pixel_values=pixel_values(images, self.processor.image_processor, self.device))
        probs = torch.sigmoid(out.logits.float())  # [B, boxes, Q]
        conf, best = probs.max(dim=1)
        centres = torch.gather(out.pred_boxes[..., :2].float(), 1, best[..., None].expand(-1, -1, 2))
        return conf.cpu().numpy(), centres.cpu().numpy()

    def score(self, images, prompts):
        parsed = [parse_objects(p) for p in prompts]
        ok = np.array([bool(p.objects) and all(self._fits(o) for o in p.objects) for p in parsed])
        for p, good in zip(prompts, ok):
            if not good and p not in self.rejected:
                self.rejected.add(p)
                log.warning("detector_composition: prompt %r names no object the detector's text encoder can take "
                            "(at most %d tokens as %r); its images score NaN and are dropped", p,
                            self.max_tokens, self.query)
        scores = np.full(len(images), np.nan)
        idx = np.flatnonzero(ok)
        for start in range(0, len(idx), self.batch_size):
            part = idx[start:start + self.batch_size]
            conf, centres = self.confidences(images[part], [parsed[i] for i in part])
            for row, i in enumerate(part):
                k = len(parsed[i].objects)
                scores[i] = conf[row, :k].mean() * self._relation_term(parsed[i].relation, centres[row, :k])
        return scores

    def _relation_term(self, relation: Optional[str], centres: np.ndarray) -> float:
        if relation not in SPATIAL or self.relation_weight == 0.0 or len(centres) < 2:
            return 1.0
        offset = float(np.dot(centres[1] - centres[0], SPATIAL[relation]))
        return (1 - self.relation_weight) + self.relation_weight / (1 + np.exp(-offset / self.relation_scale))
