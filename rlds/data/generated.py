"""The paper's generated prompt sets for real images, each split three ways by a fixed rule.

- `relations`: "<object> <relation> <object>" over a class list (rlds/data/lists/objects.txt, or a
  user's), with the paper's relations "and", "next to", "near", "on side of", "beside". A share of
  the classes is unseen: every prompt naming one is held out for evaluation, so the evaluation asks
  for objects the policy never trained on. Of the prompts of seen classes, a small share is the
  validation split.
- `occupations`: "a photo of a <occupation>" (rlds/data/lists/occupations.txt), for the fairness
  reward; unseen occupations are held out, as the paper evaluates on occupations it did not train on.

Which part a class or prompt falls in depends only on its text (a hash), so a split never moves when
the list grows, and every process agrees on it without sharing state.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

LISTS = Path(__file__).parent / "lists"
PARTS = ("train", "validation", "heldout")
PAPER_RELATIONS = ("and", "next to", "near", "on side of", "beside")


@dataclass(frozen=True)
class GeneratedArgs:
    """`prompts.generated_args`: what a generated set is made of and how it is split."""
    classes_file: str = ""          # one class (or occupation) a line; default: the set's shipped list
    relations: tuple[str, ...] = PAPER_RELATIONS
    template: str = "a photo of {}"  # occupations only; {} is the occupation with its article
    unseen_share: float = 0.2       # of the classes: every prompt naming one is held out
    # of the prompts of seen classes (relations) or of the seen occupations; default: the set's own
    validation_share: Optional[float] = None


# each set's shipped list and its default validation share
KINDS = {"relations": ("objects.txt", 0.02), "occupations": ("occupations.txt", 0.1)}


def generated_args(raw: dict, key: str, fail) -> GeneratedArgs:
    """`prompts.generated_args` at dotted `key`, checked: unknown names and bad shares are errors."""
    known = GeneratedArgs.__dataclass_fields__
    for name in raw:
        if name not in known:
            fail(f"{key}.{name}", f"unknown key (known keys here: {', '.join(known)})")
    args = GeneratedArgs(**{k: tuple(v) if k == "relations" else v for k, v in raw.items()})
    for name in ("unseen_share", "validation_share"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            fail(f"{key}.{name}", f"must be in [0, 1); got {value}")
    if args.classes_file and not Path(args.classes_file).is_file():
        fail(f"{key}.classes_file", f"file not found: {args.classes_file}")
    if "{}" not in args.template:
        fail(f"{key}.template", f"needs a {{}} for the occupation; got {args.template!r}")
    return args


def share_of(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by `text`: the split's coin."""
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def read_list(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    items = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(set(items)) != len(items):
        dup = sorted({x for x in items if items.count(x) > 1})
        raise ValueError(f"{path}: listed more than once: {', '.join(dup)}")
    return items


def with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def iter_part(kind: str, part: str, args: GeneratedArgs = GeneratedArgs()) -> Iterator[str]:
    """The `part` (train | validation | heldout) of generated set `kind` (relations | occupations),
    made one prompt at a time: with the paper's 532 classes, relations are 1.4 M prompts."""
    if kind not in KINDS:
        raise KeyError(f"unknown generated prompt set {kind!r}; known: {', '.join(KINDS)}")
    if part not in PARTS:
        raise KeyError(f"unknown part {part!r}; known: {', '.join(PARTS)}")
    shipped, default_share = KINDS[kind]
    names = read_list(Path(args.classes_file) if args.classes_file else LISTS / shipped)
    validation_share = default_share if args.validation_share is None else args.validation_share
    unseen = {n for n in names if share_of(n, "unseen") < args.unseen_share}
    if kind == "occupations":
        for n in names:
            here = "heldout" if n in unseen else (
                "validation" if share_of(n, "validation") < validation_share else "train")
            if here == part:
                yield args.template.format(with_article(n))
        return
    for a in names:
        for b in names:
            if a == b or (part == "heldout") != (a in unseen or b in unseen):
                continue
            for rel in args.relations:
                prompt = f"{with_article(a)} {rel} {with_article(b)}"
                if part == "heldout" or (share_of(prompt, "validation") < validation_share) == (part == "validation"):
                    yield prompt


def generated_prompts(kind: str, part: str, args: GeneratedArgs = GeneratedArgs()) -> list[str]:
    """The whole `part` as a list (see `iter_part`)."""
    return list(iter_part(kind, part, args))
