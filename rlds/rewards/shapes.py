"""ShapesWorld's programmatic rewards: a detector, and the paper's three rewards on top of it.

No learned weights: the detector segments colour blobs and scores them against the renderer's colour
prototypes and ideal shape features, softly, so that every reward is dense (a half-right picture gets
partial credit), not 0/1. Images are uint8 [B, H, W, 3] (the renderer's 32x32; other sizes work).

Detector (`detect`):
  1. background = the per-channel median of the image's outermost pixel ring (tolerates tints);
  2. each pixel is read as a blend of the background and the prototype whose blend line passes
     nearest to it, and labelled with that colour when its share is at least 1/2 (else background);
     4-connected pixels of one colour label form a blob; blobs under MIN_AREA pixels are dropped;
  3. colour term: the blob's colour m (the median of its purest quarter: the pixels farthest from the
     background) gets p(c) = L_c / (sum_c' L_c' + L_other), L_c = exp(-|m - proto_c|^2 / (2 * 40^2)),
     with an "other" class at a fixed distance of 3 sigma (L_other = exp(-4.5)): near a prototype
     p ~ 1, halfway between two ~ 0.5 each, far from all ~ 0;
  4. shape term, measured on soft coverage (interior pixels 1, pixels within one pixel of the edge:
     their share of m, below COVER_FLOOR taken as 0), which avoids the rasterisation error of hard
     masks on 7-16 pixel shapes: area = sum of coverage, the bbox's edges at sub-pixel positions from
     the largest coverage in the outermost rows/columns. Features: fill = area / bbox area (square 1,
     circle pi/4, triangle 1/2), asymmetry = 6 * largest offset of the centroid from the bbox centre in
     bbox units (0 for circle and square, 1 for a triangle pointing any of the four ways), aspect =
     log(w / h) (0 for all three); p(s) = L_s / (sum_s' L_s' + L_other), L_s = exp(-d_s^2 / 2), d_s the
     feature distance to shape s in units of (0.08, 0.3, 0.25);
  5. size term: sigmoid((area - 12) / 2), so that specks do not count as objects;
  the detection's centre is its bbox centre (the renderer's convention for an object's centre).
  confidence(colour, shape) = p(colour) * p(shape) * size term (a colour-free object: p(colour) := 1).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from rlds.data.shapes import COLOURS, SHAPES, SIZE, parse_prompt, relation_offsets
from rlds.rewards.base import ImageReward
from rlds.rewards.parity import NONE, ParityReward

PROTOS = np.array(list(COLOURS.values()), np.float32)
COLOUR_NAMES = tuple(COLOURS)
MIN_AREA = 6
COVER_FLOOR = 0.2
COLOUR_SIGMA = 40.0
OTHER_LIKELIHOOD = float(np.exp(-4.5))  # the "none of these" class sits 3 sigma away
SHAPE_FEATURES = {"circle": (np.pi / 4, 0.0), "square": (1.0, 0.0), "triangle": (0.5, 1.0)}
FEATURE_SCALES = (0.08, 0.3, 0.25)  # fill, asymmetry, aspect


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass
class Detection:
    shape: str                       # the most likely shape
    colour: str                      # the most likely colour
    centre: tuple[float, float]      # sub-pixel bbox centre (x, y), the renderer's convention
    area: int                        # pixels of the blob
    confidence: float                # match(colour, shape) for the most likely pair
    colour_probs: dict
    shape_probs: dict
    size_term: float
    rgb: tuple[float, float, float]  # the blob's colour (median of its purest pixels)

    def match(self, colour: Optional[str], shape: str) -> float:
        """The confidence that this blob is a `colour` `shape` (colour None: any colour)."""
        c = 1.0 if colour is None else self.colour_probs[colour]
        return c * self.shape_probs[shape] * self.size_term


# ---------------------------------------------------------------- segmentation

def background_colour(image: np.ndarray) -> np.ndarray:
    ring = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(ring, axis=0)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal nonzero labels; returns ids (0 = none), min-label propagation."""
    h, w = cls.shape
    same_v = (cls[1:] == cls[:-1]) & (cls[1:] > 0)
    same_h = (cls[:, 1:] == cls[:, :-1]) & (cls[:, 1:] > 0)
    big = h * w + 1
    lab = np.where(cls > 0, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        new = lab.copy()
        new[1:] = np.where(same_v, np.minimum(new[1:], lab[:-1]), new[1:])
        new[:-1] = np.where(same_v, np.minimum(new[:-1], lab[1:]), new[:-1])
        new[:, 1:] = np.where(same_h, np.minimum(new[:, 1:], lab[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(same_h, np.minimum(new[:, :-1], lab[:, 1:]), new[:, :-1])
        # pointer jumping: a label is a pixel index, so take that pixel's label (converges in ~log steps)
        flat = np.append(new.reshape(-1), big)
        new = np.where(new < big, flat[np.minimum(new, big) - 1], big)
        if np.array_equal(new, lab):
            return np.where(lab < big, lab, 0)
        lab = new


def _blend(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels x [..., 3] as blends of colours a and b: (share t of b in [0, 1], distance off the a-b line)."""
    ab = b - a
    t = np.clip(((x - a) @ ab) / max(float(ab @ ab), 1e-6), 0, 1)
    return t, np.linalg.norm(x - (a + t[..., None] * ab), axis=-1)


def segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background rgb, colour label per pixel 0 = background / 1..4 = COLOURS, blob id per pixel).

    A pixel is read as a blend of the background and the colour whose blend line passes nearest to it;
    it belongs to that colour when the colour's share is at least one half. (Nearest-prototype labels
    would call a half-covered red edge pixel on gray "yellow".)"""
    x = image.astype(np.float32)
    bg = background_colour(image)
    shares, offs = zip(*(_blend(x, bg, p) for p in PROTOS))
    best = np.argmin(np.stack(offs), axis=0)
    share = np.take_along_axis(np.stack(shares), best[None], axis=0)[0]
    cls = np.where(share >= 0.5, best + 1, 0)
    return bg, cls, _components(cls)


# ---------------------------------------------------------------- detection

def _posterior(log_likelihoods: np.ndarray) -> np.ndarray:
    lik = np.exp(log_likelihoods)
    return lik / (lik.sum() + OTHER_LIKELIHOOD)


def _describe(image: np.ndarray, bg: np.ndarray, blob: np.ndarray, others: np.ndarray) -> Detection:
    # The blob's colour: the median of its purest quarter (the pixels farthest from the background).
    x = image.astype(np.float32)
    pix = x[blob]
    dist_bg = np.linalg.norm(pix - bg, axis=1)
    rgb = np.median(pix[dist_bg >= np.quantile(dist_bg, 0.75)], axis=0)
    colour_p = _posterior(-((rgb - PROTOS) ** 2).sum(-1) / (2 * COLOUR_SIGMA ** 2))

    # Soft coverage (the share of the blob's colour in each pixel, its edge ring included) measures the
    # shape without the rasterisation error of hard masks: a small circle's hard mask loses its caps.
    region = _dilate(blob) & ~others
    cover = np.where(region, _blend(x, bg, rgb)[0], 0.0)
    cover[blob & ~_dilate(~blob)] = 1.0  # the interior is solid by definition; noise there says nothing
    cover = np.where(cover >= COVER_FLOOR, cover, 0.0)  # ignore faint noise around the blob
    area = float(cover.sum())
    cols, rows = cover.max(axis=0), cover.max(axis=1)
    (x0, x1), (y0, y1) = np.flatnonzero(cols)[[0, -1]], np.flatnonzero(rows)[[0, -1]]
    left, right = x0 + 1 - cols[x0], x1 + cols[x1]  # pixel i covers [i, i + 1)
    top, bottom = y0 + 1 - rows[y0], y1 + rows[y1]
    w, h = max(right - left, 1.0), max(bottom - top, 1.0)
    yy, xx = np.mgrid[:cover.shape[0], :cover.shape[1]] + 0.5
    cx, cy = (xx * cover).sum() / area, (yy * cover).sum() / area
    centre = ((left + right) / 2, (top + bottom) / 2)
    fill = area / (w * h)
    asym = 6 * max(abs(cy - centre[1]) / h, abs(cx - centre[0]) / w)
    feats = np.array([[fill, asym, np.log(w / h)]])
    protos = np.array([[f, a, 0.0] for f, a in SHAPE_FEATURES.values()])
    shape_p = _posterior(-(((feats - protos) / FEATURE_SCALES) ** 2).sum(-1) / 2)

    shape, colour = SHAPES[int(shape_p.argmax())], COLOUR_NAMES[int(colour_p.argmax())]
    size_term = _sigmoid((area - 12) / 2)
    return Detection(shape=shape, colour=colour, centre=(float(centre[0]), float(centre[1])),
                     area=int(blob.sum()), confidence=float(colour_p.max() * shape_p.max() * size_term),
                     colour_probs=dict(zip(COLOUR_NAMES, colour_p.tolist())),
                     shape_probs=dict(zip(SHAPES, shape_p.tolist())), size_term=size_term,
                     rgb=tuple(float(v) for v in rgb))


def detect(image: np.ndarray, max_detections: int = 8) -> list[Detection]:
    """The coloured blobs of an image as detections, largest first."""
    bg, _, ids = segment(image)
    found, counts = np.unique(ids[ids > 0], return_counts=True)
    order = [i for i, n in sorted(zip(found, counts), key=lambda t: -t[1]) if n >= MIN_AREA]
    return [_describe(image, bg, ids == i, (ids > 0) & (ids != i)) for i in order[:max_detections]]


# ---------------------------------------------------------------- composition

class ShapesComposition(ImageReward):
    """Compositionality: mean detector confidence over the prompt's objects x a relation term.

    For a prompt naming objects o_1..o_k (k = 1 or 2) and an optional relation R(o_1, o_2):
        reward = max over assignments  mean_i conf(o_i)  x  rel
    An assignment maps each named object to a distinct detection or to nothing; conf(o_i) is the
    detection's match(colour, shape) (0 for nothing). rel = 1 without a relation; with one,
        rel = sigmoid((along - max(relation_min, across)) / relation_scale)
    where `along` is the signed offset of the two detections' centres in the relation's direction and
    `across` the offset across it (rlds.data.shapes.relation_offsets): the relation must hold by a few
    pixels and dominate the other axis. When either object is assigned nothing, rel = 0.5 (unknown).
    So: a correct picture ~1, one right object out of two ~0.25, the right objects in swapped places
    ~0.25 (the max falls back to one object), a blank picture 0. Never less than after erasing an object.

    `colour_named_only` scores 0 for a prompt that names no colour (the mirror of ShapesParity's
    `colour_free_only`). On "a circle" the detector is surest of the shapes the base draws best, its
    red ones (CFG-free base samples: red 0.60, green 0.51, blue 0.50), so in a task that mixes
    colour-free groups under the parity reward it can pull those groups back to red.
    """

    min_image_size = SIZE  # calibrated on the renderer's images: smaller shapes fall under the size term

    def __init__(self, relation_min: float = 3.0, relation_scale: float = 1.5, colour_named_only: bool = False):
        self.relation_min, self.relation_scale = relation_min, relation_scale
        self.colour_named_only = bool(colour_named_only)

    def relation_term(self, a: Detection, b: Detection, relation: str) -> float:
        along, across = relation_offsets(a.centre, b.centre, relation)
        return _sigmoid((along - max(self.relation_min, across)) / self.relation_scale)

    def explain(self, image: np.ndarray, prompt: str) -> tuple[float, list, float]:
        """(reward, the detection chosen for each named object or None, relation term)."""
        p = parse_prompt(prompt)
        dets = detect(image)
        best = (0.0, [None] * len(p.objects), 0.5 if p.relation else 1.0)
        for choice in itertools.product([None] + dets, repeat=len(p.objects)):
            if len(choice) == 2 and choice[0] is not None and choice[0] is choice[1]:
                continue
            confs = [d.match(*o) if d is not None else 0.0 for d, o in zip(choice, p.objects)]
            rel = 1.0
            if p.relation:
                rel = 0.5 if None in choice else self.relation_term(choice[0], choice[1], p.relation)
            r = float(np.mean(confs)) * rel
            if r > best[0]:
                best = (r, list(choice), rel)
        return best

    def score(self, images, prompts):
        skip = [self.colour_named_only and not parse_prompt(p).names_colour for p in prompts]
        return np.array([0.0 if s else self.explain(im, p)[0] for im, p, s in zip(images, prompts, skip)])

    def accuracy(self, image: np.ndarray, prompt: str) -> bool:
        """Fully right: every named object found with confidence > 0.5, and the relation holding."""
        p = parse_prompt(prompt)
        dets = detect(image)
        for choice in itertools.permutations(dets, len(p.objects)):
            if all(d.match(*o) > 0.5 for d, o in zip(choice, p.objects)) and (
                    p.relation is None or self.relation_term(choice[0], choice[1], p.relation) > 0.5):
                return True
        return False


# ---------------------------------------------------------------- parity

def colour_probabilities(image: np.ndarray) -> np.ndarray:
    """The largest detected shape's colour posterior over COLOUR_NAMES, renormalised over them, or
    zeros (no blob, or one of no known colour: no colour at 0.5 or more before renormalising)."""
    dets = [d for d in detect(image, max_detections=1) if d.area >= 12]
    if not dets or max(dets[0].colour_probs.values()) < 0.5:
        return np.zeros(len(COLOUR_NAMES))
    p = np.array([dets[0].colour_probs[c] for c in COLOUR_NAMES])
    return p / p.sum()


def colour_label(image: np.ndarray) -> str:
    """The colour of the largest detected shape, or "none" (no blob, or one of no known colour)."""
    p = colour_probabilities(image)
    return COLOUR_NAMES[int(p.argmax())] if p.sum() > 0 else NONE


class ShapesParity(ParityReward):
    """Fairness/diversity over a group of images of one colour-free prompt (rlds.rewards.parity):
    each image's label is the colour of its largest shape, NONE when it has no shape. In a group of
    seven reds and a blue, the blue image scores about 0.25 above the reds.

    `min_quality` > 0 counts a shape only when the image's ShapesQuality reaches it (else NONE, the
    worst case), so that a group cannot buy balance with badly drawn shapes of other colours. The
    base model's colour-free shapes score 0.53-0.73 (median 0.67).

    `colour_free_only` scores 0 for a group whose prompt names a colour: there the prompt, not
    fairness, decides the colour (a task can then mix colour-free prompts with colour-named ones that
    another reward, the detector, holds to their colours, in one batch and one update).

    `soft` > 0 mixes in parity over each shape's colour posterior (rlds.rewards.parity): in a group
    of reds, the red least sure of being red scores highest."""

    min_image_size = SIZE

    classes = COLOUR_NAMES

    def __init__(self, min_quality: float = 0.0, colour_free_only: bool = False, soft: float = 0.0,
                 soft_temperature: float = 1.0):
        if not 0.0 <= min_quality <= 1.0:
            raise ValueError(f"min_quality {min_quality} is not a ShapesQuality score in [0, 1]")
        self.min_quality, self.quality = min_quality, ShapesQuality()
        self.colour_free_only = bool(colour_free_only)
        self.set_soft(soft, soft_temperature, "shapes_parity")

    def __call__(self, images, prompts, group_ids):
        if not self.colour_free_only:
            return super().__call__(images, prompts, group_ids)
        out = np.zeros(len(images), dtype=np.float32)
        free = np.array([not parse_prompt(p).names_colour for p in prompts], bool)
        if free.any():
            out[free] = super().__call__(images[free], [p for p, f in zip(prompts, free) if f],
                                         np.asarray(group_ids)[free])
        return out

    def probabilities(self, images, prompts):
        probs = np.stack([colour_probabilities(im) for im in images])
        if self.min_quality > 0:
            probs[self.quality.score(images, prompts) < self.min_quality] = 0.0
        return probs


# ---------------------------------------------------------------- quality

def _neighbour_min(a: np.ndarray) -> np.ndarray:
    p = np.pad(a, 1, mode="edge")
    return np.minimum.reduce([p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])


class ShapesQuality(ImageReward):
    """A cheap image-quality score in [0, 1], independent of the prompt.

        score = content * (background * solid * edges) ** (1/3)
    - background: mean of exp(-|x - bg| / sigma) over the pixels more than one pixel away from any blob
      (a clean, uniform background; bg = the border median, so a tint is not penalised);
    - solid: mean of exp(-residual / sigma) over the blobs and their one-pixel surrounds, the residual
      being the distance to the blob's colour inside, and, within one pixel of the boundary (either
      side), the distance to the blend line between background and blob colour (anti-aliasing is fine,
      shading and speckle are not);
    - edges: mean over the blobs' boundary pixels of min(1, 2 * step), step = the pixel's share of the
      blob colour minus the smallest share among its 4 neighbours: an edge drawn within about one pixel
      steps by at least 0.5, a blurred one by less;
    - content = min(1, area of the largest blob / 20): a blank canvas scores 0, not 1.
    Renders score ~1, renders with noise or blur less, pure noise ~0.

    `terms` picks which of background, solid and edges enter the geometric mean (content always
    multiplies): `[background]` is a reward for a clean background alone, which neither the detector
    nor the parity reward sees.

    `colour_named_only` scores 0 for a prompt that names no colour, as the detector's option does: the
    score depends on the colour drawn (the base draws its reds best), so on colour-free groups it would
    pull them back to red against the parity reward; on colour-named ones the prompt fixes the colour,
    and the score ranks a group's images by how well they are drawn.
    """

    min_image_size = SIZE
    TERMS = ("background", "solid", "edges")

    def __init__(self, sigma: float = 16.0, terms: Sequence[str] = TERMS, colour_named_only: bool = False):
        unknown = sorted(set(terms) - set(self.TERMS))
        if unknown or not terms:
            raise ValueError(f"terms {list(terms)}: choose one or more of {', '.join(self.TERMS)}")
        self.sigma, self.chosen = sigma, tuple(terms)
        self.colour_named_only = bool(colour_named_only)

    def terms(self, image: np.ndarray) -> dict:
        x = image.astype(np.float32)
        bg, _, ids = segment(image)
        near_blob = np.zeros(ids.shape, bool)
        solid, edges, largest = [], [], 0
        found, counts = np.unique(ids[ids > 0], return_counts=True)
        for i, n in zip(found, counts):
            if n < MIN_AREA:
                continue
            largest = max(largest, int(n))
            blob = ids == i
            pix = x[blob]
            d = np.linalg.norm(pix - bg, axis=1)
            m = np.median(pix[d >= np.quantile(d, 0.75)], axis=0)
            share, off = _blend(x, bg, m)
            ring = _dilate(blob) & _dilate(~blob)  # within one pixel of the boundary, either side
            residual = np.where(ring, off, np.linalg.norm(x - m, axis=-1))
            region = blob | ring
            solid.append(np.exp(-residual[region] / self.sigma))
            step = share - _neighbour_min(share)
            edges.append(np.minimum(1.0, 2 * step[blob & ring]))
            near_blob |= region
        far = ~near_blob
        background = np.exp(-np.linalg.norm(x[far] - bg, axis=-1) / self.sigma).mean() if far.any() else 0.0
        return {"background": float(background),
                "solid": float(np.concatenate(solid).mean()) if solid else 0.0,
                "edges": float(np.concatenate(edges).mean()) if edges else 0.0,
                "content": min(1.0, largest / 20.0)}

    def score_one(self, image: np.ndarray) -> float:
        t = self.terms(image)
        return t["content"] * float(np.prod([t[k] for k in self.chosen])) ** (1 / len(self.chosen))

    def score(self, images, prompts):
        if not self.colour_named_only:
            return np.array([self.score_one(im) for im in images])
        return np.array([self.score_one(im) if parse_prompt(p).names_colour else 0.0
                         for im, p in zip(images, prompts)])
