"""ShapesWorld: 32x32 images of one or two coloured shapes, their captions, and the prompt sets.

The world in which every part of the paper runs for real on a CPU (see DESIGN.md, "ShapesWorld").

- Image: 32x32 RGB, a plain light-gray background (215, 215, 215), optionally tinted per channel
  (the sampler tints by up to +-10), with one or two solid shapes drawn anti-aliased (4x4 supersampling).
- Shapes: circle (diameter = size), square (side = size), triangle (apex up, base = height = size).
  An object's centre is the centre of its bounding box; coordinates are (x right, y down) in pixels,
  pixel i covering [i, i + 1).
- Colours: red, green, blue, yellow, as the RGB prototypes in COLOURS (the reward's detector uses the same).
- Captions (the grammar `parse_prompt` reads back):
      "a [colour] shape"  |  "a [colour] shape RELATION a [colour] shape"
  RELATION is "to the left of", "to the right of", "above" or "below", read as objects[0] REL objects[1].
  Colour-free captions omit both colours. Two objects always differ (in colour or shape; colour-free:
  in shape), so each named object is one thing in the picture.
- A relation holds "with a clear margin": along its axis the two bounding boxes are apart by at least
  GAP pixels, and the offset across the axis is at most PERP_RATIO times the offset along it, so no
  other relation describes the picture as well.
- Bias: when a caption names no colour, each object is drawn `bias_colour` with probability `bias`
  (default 85% red), else one of the other three colours uniformly. That is the pretraining bias the
  fairness task then has to undo.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
BACKGROUND = (215, 215, 215)
# canonical relation name -> the words of a caption
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
KINDS = ("single", "relation", "colour_free_single", "colour_free_relation")
TASKS = ("composition", "fairness", "quality")
GAP = 2.0           # pixels between the two bounding boxes along the relation's axis, at least
PERP_RATIO = 0.5    # offset across the axis / offset along it, at most
SINGLE_SIZES = (8.0, 16.0)
PAIR_SIZES = (7.0, 11.0)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    centre: tuple[float, float]  # (x, y) in pixels
    size: float                  # side of the bounding box, pixels


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    relation: Optional[str] = None  # objects[0] <relation> objects[1]; None for one object
    name_colours: bool = True       # does the caption name the colours?
    background: tuple[int, int, int] = BACKGROUND


@dataclass(frozen=True)
class Prompt:
    objects: tuple[tuple[Optional[str], str], ...]  # (colour or None, shape)
    relation: Optional[str] = None

    @property
    def names_colour(self) -> bool:
        return any(c is not None for c, _ in self.objects)

    @property
    def text(self) -> str:
        nps = [f"a {c} {s}" if c else f"a {s}" for c, s in self.objects]
        return nps[0] if self.relation is None else f"{nps[0]} {RELATIONS[self.relation]} {nps[1]}"


# ---------------------------------------------------------------- geometry and rendering

def relation_offsets(a: tuple[float, float], b: tuple[float, float], relation: str) -> tuple[float, float]:
    """(signed offset along the relation's direction, |offset across it|) of centre a relative to b.

    Positive along-offsets mean "a <relation> b" holds; the reward and the sampler share this."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    across = abs(dy) if relation in ("left of", "right of") else abs(dx)
    return along, across


def relation_holds(a: Obj, b: Obj, relation: str) -> bool:
    along, across = relation_offsets(a.centre, b.centre, relation)
    return along >= (a.size + b.size) / 2 + GAP and across <= PERP_RATIO * along


def _inside(o: Obj, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h = o.size / 2
    dx, dy = x - o.centre[0], y - o.centre[1]
    if o.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if o.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if o.shape == "triangle":  # apex at the top, base at the bottom: half-width grows linearly downwards
        t = (dy + h) / (2 * h)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)
    raise ValueError(f"unknown shape {o.shape!r}; ShapesWorld draws {SHAPES}")


def render(scene: Scene, antialias: int = 4) -> np.ndarray:
    """The scene as a uint8 [32, 32, 3] image; deterministic (plain float arithmetic, then rounding)."""
    k = max(1, int(antialias))
    coords = (np.arange(SIZE * k) + 0.5) / k  # sub-pixel centres
    x, y = np.meshgrid(coords, coords)
    img = np.empty((SIZE, SIZE, 3), np.float64)
    img[:] = scene.background
    for o in scene.objects:
        cover = _inside(o, x, y).reshape(SIZE, k, SIZE, k).mean(axis=(1, 3))[..., None]
        img = img * (1 - cover) + np.asarray(COLOURS[o.colour], np.float64) * cover
    return np.rint(img).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------- captions and the grammar

def caption(scene: Scene) -> str:
    if len(scene.objects) == 2 and (scene.relation is None or
                                    not relation_holds(scene.objects[0], scene.objects[1], scene.relation)):
        raise ValueError(f"scene relation {scene.relation!r} does not hold with a clear margin: {scene}")
    objs = tuple((o.colour if scene.name_colours else None, o.shape) for o in scene.objects)
    return Prompt(objs, scene.relation if len(objs) == 2 else None).text


def _grammar_error(text: str, why: str) -> ValueError:
    return ValueError(
        f"prompt {text!r} is outside the ShapesWorld grammar ({why}); expected "
        f"'a [colour] shape' or 'a [colour] shape RELATION a [colour] shape' with colours "
        f"{'/'.join(COLOURS)}, shapes {'/'.join(SHAPES)}, relations {' / '.join(RELATIONS.values())}")


@lru_cache(maxsize=4096)
def parse_prompt(text: str) -> Prompt:
    words = text.lower().strip().rstrip(".").split()
    pos = 0

    def noun_phrase():
        nonlocal pos
        if pos >= len(words) or words[pos] != "a":
            raise _grammar_error(text, f"expected 'a' at word {pos + 1}")
        pos += 1
        colour = None
        if pos < len(words) and words[pos] in COLOURS:
            colour, pos = words[pos], pos + 1
        if pos >= len(words) or words[pos] not in SHAPES:
            got = words[pos] if pos < len(words) else "the end"
            raise _grammar_error(text, f"expected a shape at word {pos + 1}, got {got!r}")
        pos += 1
        return colour, words[pos - 1]

    first = noun_phrase()
    if pos == len(words):
        return Prompt((first,))
    for rel, phrase in RELATIONS.items():
        n = len(phrase.split())
        if words[pos:pos + n] == phrase.split():
            pos += n
            second = noun_phrase()
            if pos != len(words):
                raise _grammar_error(text, f"unexpected words after the second object: {words[pos:]}")
            if (first[0] is None) != (second[0] is None):
                raise _grammar_error(text, "name the colours of both objects or of neither")
            if first == second:
                raise _grammar_error(text, "the two objects must differ")
            return Prompt((first, second), rel)
    raise _grammar_error(text, f"expected a relation at word {pos + 1}, got {' '.join(words[pos:])!r}")


# ---------------------------------------------------------------- sampling scenes

def sample_prompt(rng: np.random.Generator, kind: str) -> Prompt:
    if kind not in KINDS:
        raise ValueError(f"unknown caption kind {kind!r}; one of {KINDS}")
    with_colour = not kind.startswith("colour_free")
    objects = _objects(with_colour)
    if kind.endswith("single"):
        return Prompt((objects[rng.integers(len(objects))],))
    i, j = rng.choice(len(objects), size=2, replace=False)
    return Prompt((objects[i], objects[j]), list(RELATIONS)[rng.integers(len(RELATIONS))])


def _biased_colour(rng, bias: float, bias_colour: str) -> str:
    if rng.random() < bias:
        return bias_colour
    others = [c for c in COLOURS if c != bias_colour]
    return others[rng.integers(len(others))]


def scene_for_prompt(prompt: Prompt, rng: np.random.Generator, bias: float = 0.85,
                     bias_colour: str = "red", tint: int = 10) -> Scene:
    """A random scene that the prompt truly describes; unnamed colours follow the bias."""
    if bias_colour not in COLOURS:
        raise ValueError(f"bias_colour {bias_colour!r} is not one of {tuple(COLOURS)}")
    lo, hi = SINGLE_SIZES if len(prompt.objects) == 1 else PAIR_SIZES
    colours = [c or _biased_colour(rng, bias, bias_colour) for c, _ in prompt.objects]
    sizes = rng.uniform(lo, hi, size=len(prompt.objects))
    background = tuple(int(v) for v in np.clip(np.array(BACKGROUND) + rng.integers(-tint, tint + 1, 3), 0, 255))
    for _ in range(10_000):  # rejection sampling; a valid two-object layout turns up within ~10 tries
        objs = tuple(Obj(s, c, tuple(float(v) for v in rng.uniform(z / 2 + 1, SIZE - z / 2 - 1, 2)), float(z))
                     for (_, s), c, z in zip(prompt.objects, colours, sizes))
        if prompt.relation is None or relation_holds(objs[0], objs[1], prompt.relation):
            return Scene(objs, prompt.relation, prompt.objects[0][0] is not None, background)
    raise RuntimeError(f"could not lay out {prompt.text!r}")


def scene_kind(scene: Scene) -> str:
    kind = "single" if len(scene.objects) == 1 else "relation"
    return kind if scene.name_colours else "colour_free_" + kind


def sample_scene(rng: np.random.Generator, caption_kind: str, bias: float = 0.85,
                 bias_colour: str = "red", tint: int = 10) -> Scene:
    return scene_for_prompt(sample_prompt(rng, caption_kind), rng, bias, bias_colour, tint)


# ---------------------------------------------------------------- prompt sets and the held-out split

def _objects(with_colour: bool) -> list[tuple[Optional[str], str]]:
    return [(c, s) for c in (COLOURS if with_colour else [None]) for s in SHAPES]


def all_prompts(with_colour: bool) -> list[Prompt]:
    objects = _objects(with_colour)
    singles = [Prompt((o,)) for o in objects]
    pairs = [Prompt((a, b), r) for a, b in itertools.permutations(objects, 2) for r in RELATIONS]
    return singles + pairs


def _combination_index(prompt: Prompt) -> int:
    """colour index(A) + shape index(A) + colour index(B) + shape index(B) + axis index (indices in
    the order of COLOURS and SHAPES; axis 0 = left/right, 1 = above/below): symmetric in A and B and
    blind to the direction on the axis, so every phrasing of a combination {A, B, axis} ("A left of
    B", "B right of A", "B left of A", "A right of B") gets the same index."""
    col, shp = list(COLOURS), list(SHAPES)
    return sum(col.index(c) + shp.index(s) for c, s in prompt.objects) + (prompt.relation in ("above", "below"))


def split(prompt: Prompt) -> str:
    """The deterministic split of every prompt: "heldout" (for `rlds eval`), "validation" (scored
    while training runs, `validation` in a config) or "train".

    Coloured two-object prompts, by combination (`_combination_index`): held out when the index is
    divisible by 4 (33 of the 132 combinations, 132 of the 528 prompts), validation when it is 2
    modulo 8 (8 combinations, 32 prompts); every object and every relation still appears in training.
    Colour-free prompts: every prompt that names a triangle is held out (an unseen subject, as the
    paper's fairness evaluation uses unseen occupations); of those left, the circle-square pairs on
    the vertical axis ("a circle above a square", ...: 4 prompts) are the validation split, and "a
    circle", "a square" and the horizontal pairs train (the one-object prompts stay in training: the
    held-out set has both forms). Coloured single-object prompts: training.
    """
    if prompt.objects[0][0] is None:
        if any(s == "triangle" for _, s in prompt.objects):
            return "heldout"
        return "validation" if prompt.relation in ("above", "below") else "train"
    if prompt.relation is None:
        return "train"
    index = _combination_index(prompt)
    if index % 4 == 0:
        return "heldout"
    return "validation" if index % 8 == 2 else "train"


def _task_prompts(task: str) -> list[Prompt]:
    if task == "composition":
        return all_prompts(with_colour=True)
    if task == "fairness":
        return all_prompts(with_colour=False)
    if task == "quality":  # image quality over everything the world can be asked for
        return all_prompts(with_colour=True) + all_prompts(with_colour=False)
    raise ValueError(f"unknown ShapesWorld task {task!r}; one of {TASKS}")


def prompts_of(task: str, part: str) -> list[str]:
    """A task's prompts in one part of the split: "train", "validation" or "heldout"."""
    return [p.text for p in _task_prompts(task) if split(p) == part]


def training_prompts(task: str) -> list[str]:
    return prompts_of(task, "train")


def heldout_prompts(task: str) -> list[str]:
    return prompts_of(task, "heldout")
