"""Fairness for real images: the paper's parity reward (rlds.rewards.parity) over a zero-shot CLIP
classifier of an attribute, by default perceived skin tone in four classes as in the paper.

Each image is first checked for its subject (a person): CLIP's softmax over the subject text and the
`absent` texts must give the subject at least `subject_threshold`, or the image is NONE, counted
apart and as the worst case, never given a class. A subject's class is the argmax of CLIP's
similarity to each class text. Every text is embedded once, when the reward is built; every image of
a batch goes through the image tower in one forward, on the actor's GPU when it has one.
"""
from __future__ import annotations

import numpy as np
import torch

from rlds.rewards.parity import NONE, ParityReward
from rlds.rewards.vision import load_vision_model, pixel_values, reward_device

SKIN_TONE = {
    "light": "a photo of a person with light skin",
    "medium_light": "a photo of a person with medium-light skin",
    "medium_dark": "a photo of a person with medium-dark skin",
    "dark": "a photo of a person with dark skin",
}
SUBJECT = "a photo of a person"
ABSENT = ("a photo of an object", "a photo of an animal", "a photo of a landscape", "a blank image")


class ClipParity(ParityReward):
    """`clip_parity`: minus the statistical parity of a group's CLIP labels.

    args: model (hub id or folder, default openai/clip-vit-large-patch14), classes ({label: text},
    default SKIN_TONE), subject, absent, subject_threshold, device (auto | cpu | cuda), batch_size,
    soft and soft_temperature (parity over CLIP's class probabilities too, rlds.rewards.parity; default off)."""

    def __init__(self, model: str = "openai/clip-vit-large-patch14", classes: dict | None = None,
                 subject: str = SUBJECT, absent: list | tuple = ABSENT, subject_threshold: float = 0.5,
                 device: str = "auto", batch_size: int = 16, soft: float = 0.0,
                 soft_temperature: float = 1.0):
        from transformers import CLIPModel, CLIPProcessor

        classes = dict(SKIN_TONE if classes is None else classes)
        if len(classes) < 2 or NONE in classes:
            raise ValueError(f"clip_parity: classes must name at least two labels other than {NONE!r}; "
                             f"got {list(classes)}")
        self.classes = tuple(classes)
        self.set_soft(soft, soft_temperature, "clip_parity")
        self.device = reward_device(device)
        self.model, self.processor = load_vision_model(CLIPModel, CLIPProcessor, model, "clip_parity")
        self.model.to(self.device)
        self.batch_size, self.subject_threshold = batch_size, subject_threshold
        self.class_embeds = self._embed_texts(list(classes.values()))
        self.subject_embeds = self._embed_texts([subject, *absent])  # row 0: the subject

    @torch.no_grad()
    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _unit(self.model.get_text_features(**tokens))

    @torch.no_grad()
    def clip_probabilities(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(subject) [B], P(class | subject) [B, |A|]) from CLIP's scaled cosine similarities."""
        subject, classes = [], []
        scale = self.model.logit_scale.exp()
        for start in range(0, len(images), self.batch_size):
            x = pixel_values(images[start:start + self.batch_size], self.processor.image_processor, self.device)
            embeds = _unit(self.model.get_image_features(pixel_values=x))
            subject.append(torch.softmax(scale * embeds @ self.subject_embeds.T, -1)[:, 0])
            classes.append(torch.softmax(scale * embeds @ self.class_embeds.T, -1))
        return torch.cat(subject).cpu().numpy(), torch.cat(classes).cpu().numpy()

    def probabilities(self, images, prompts):
        subject, classes = self.clip_probabilities(images)
        return np.where((subject >= self.subject_threshold)[:, None], classes, 0.0)


def _unit(x) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features where 4.x returned the tensor
    x = x if isinstance(x, torch.Tensor) else x.pooler_output
    return x / x.norm(dim=-1, keepdim=True)
