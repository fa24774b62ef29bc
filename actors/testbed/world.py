"""Procedural shape scenes: the fixed vocabulary, captions, their parser into facts, and the PIL scene renderer.

The one owner of the `embedded:shapes` world: its trainer draws scenes here, the `shapes` rater checks facts here.

Grammar (lower case; a trailing full stop is allowed):

    prompt   := phrase | phrase "and" phrase | phrase RELATION phrase
    phrase   := COUNT COLOUR SHAPE          (plural shape after two/three/four)
    COUNT    := a | an | two | three | four
    RELATION := to the left of | to the right of | above | below     (only between two single objects)

Facts a prompt asks for: every phrase asks that its object is present (colour and shape); a counted phrase also asks
for its exact count; a relation asks that the first object's box centre lies on that side of the second's.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
# Object colours (sRGB). Chosen so that every pair is at least ~95 apart in RGB and none is near a background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 225, 30),
    "purple": (130, 40, 190),
    "orange": (240, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {shape: shape + "s" for shape in SHAPES}
COUNT_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# Muted mid-tones: far from every object colour (white and black included), so a background is never an object.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "slate": (100, 125, 130),
    "sand": (170, 155, 125),
    "sage": (120, 145, 120),
    "mauve": (155, 125, 120),
}
BACKGROUND_JITTER = 6  # per channel, uniform: backgrounds vary but stay in their family
OBJECT_JITTER = 8  # per channel: object colours vary a little so the palette is a neighbourhood, not a point
MIN_OBJECT_SIZE, MAX_OBJECT_SIZE = 12, 22  # bounding-box side in pixels at 64x64
MAX_OBJECTS = 4
MARGIN = 2  # pixels kept free at the image border
GAP = 3  # pixels kept free between two objects' boxes, so objects never touch
TRIANGLE_HEIGHT = 0.9  # upright isosceles triangle: height / base
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: exact area anti-aliasing
# GenEval's position rule: shrink the centre offset by this fraction of the two boxes' sizes, then a relation holds
# when the remaining offset points within 60 degrees of its direction.
POSITION_THRESHOLD = 0.1
# Scenes drawn for a relation keep the offset within this angle of the axis, so the relation is never borderline.
RELATION_MAX_ANGLE = 30.0

TEMPLATES = ("single", "count", "pair", "counted_pair", "relation")
TEMPLATE_EXAMPLES = {
    "single": "a red circle",
    "count": "two blue triangles",
    "pair": "a red square and a green triangle",
    "counted_pair": "two green circles and a red square",
    "relation": "a yellow triangle to the right of a green circle",
}
# How often the trainer draws each template: compositional ones more, since they are harder.
TEMPLATE_WEIGHTS = {"single": 0.15, "count": 0.2, "pair": 0.2, "counted_pair": 0.2, "relation": 0.25}
# Held-out prompts per template (100 in all): never drawn for training, used for the model's figures.
HELD_OUT_PER_TEMPLATE = {"single": 4, "count": 10, "pair": 26, "counted_pair": 30, "relation": 30}
SPLIT_SALT = "seedsift-shapes-split/v1"
# (first count, second count) of the counted-pair template: at least one count above one, at most four objects.
COUNTED_PAIRS = ((2, 1), (1, 2), (3, 1), (1, 3), (2, 2))


class ShapesGrammarError(ValueError):
    """A prompt outside the shapes grammar; the message names the word and what was expected there."""


@dataclass(frozen=True)
class Kind:
    """What an object is: its colour and shape names."""

    colour: str
    shape: str

    def phrase(self, count: int = 1) -> str:
        if count == 1:
            article = "an" if self.colour[0] in "aeiou" else "a"
            return f"{article} {self.colour} {self.shape}"
        return f"{NUMBER_WORDS[count]} {self.colour} {PLURALS[self.shape]}"


@dataclass(frozen=True)
class Fact:
    """One checkable claim: `present` (a `kind` object exists), `count` (exactly `count` of them) or `relation`
    (the `kind` object lies `relation` the `other` object)."""

    type: str
    kind: Kind
    count: int | None = None
    relation: str | None = None
    other: Kind | None = None

    def describe(self) -> str:
        if self.type == "present":
            return f"present({self.kind.colour} {self.kind.shape})"
        if self.type == "count":
            return f"count({self.kind.colour} {self.kind.shape})={self.count}"
        assert self.other is not None
        return f"{self.kind.colour} {self.kind.shape} {self.relation} {self.other.colour} {self.other.shape}"


FACT_TYPES = ("present", "count", "relation")


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt's phrases ((kind, count) pairs), its relation if any, its template name and its facts."""

    phrases: tuple[tuple[Kind, int], ...]
    relation: str | None
    template: str
    facts: tuple[Fact, ...]


@dataclass(frozen=True)
class SceneObject:
    """A drawn object: its kind and its box (x0, y0, x1, y1) in pixels, x to the right and y down."""

    kind: Kind
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass(frozen=True)
class Scene:
    """A rendered scene: uint8 (64, 64, 3) image, its caption, the caption's facts and the ground-truth objects."""

    image: np.ndarray
    caption: str
    template: str
    facts: tuple[Fact, ...]
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]


# --- parsing -----------------------------------------------------------------------------------------------------


def _words(prompt: str) -> list[str]:
    text = prompt.strip().lower()
    text = text.removesuffix(".")
    return text.split()


def _grammar_error(prompt: str, position: int, words: list[str], expected: str) -> ShapesGrammarError:
    found = f"word {position + 1} {words[position]!r}" if position < len(words) else "the end of the prompt"
    return ShapesGrammarError(
        f"prompt {prompt!r}: {found}, expected {expected}; the shapes grammar reads like "
        f"{TEMPLATE_EXAMPLES['single']!r}, {TEMPLATE_EXAMPLES['count']!r}, {TEMPLATE_EXAMPLES['pair']!r}, "
        f"{TEMPLATE_EXAMPLES['relation']!r}"
    )


def _parse_phrase(prompt: str, words: list[str], at: int) -> tuple[Kind, int, int]:
    """(kind, count, next position) of the phrase starting at word `at`."""
    if at >= len(words) or words[at] not in COUNT_WORDS:
        raise _grammar_error(prompt, at, words, f"a count ({', '.join(COUNT_WORDS)})")
    count = COUNT_WORDS[words[at]]
    if at + 1 >= len(words) or words[at + 1] not in COLOURS:
        raise _grammar_error(prompt, at + 1, words, f"a colour ({', '.join(COLOURS)})")
    colour = words[at + 1]
    nouns = {PLURALS[s]: s for s in SHAPES} if count > 1 else {s: s for s in SHAPES}
    if at + 2 >= len(words) or words[at + 2] not in nouns:
        number = "plural" if count > 1 else "singular"
        raise _grammar_error(prompt, at + 2, words, f"a {number} shape after {words[at]!r} ({', '.join(nouns)})")
    return Kind(colour, nouns[words[at + 2]]), count, at + 3


def _parse_relation(words: list[str], at: int) -> tuple[str | None, int]:
    for relation, phrase in RELATION_PHRASES.items():
        size = len(phrase.split())
        if words[at : at + size] == phrase.split():
            return relation, at + size
    return None, at


def parse_prompt(prompt: str) -> ParsedPrompt:
    """The facts a caption in the shapes grammar asks for; raises ShapesGrammarError naming the first bad word."""
    if not isinstance(prompt, str):
        raise ShapesGrammarError(f"prompt {prompt!r}: not a string")
    words = _words(prompt)
    if not words:
        raise ShapesGrammarError(f"prompt {prompt!r}: empty; write for example {TEMPLATE_EXAMPLES['single']!r}")
    kind, count, at = _parse_phrase(prompt, words, 0)
    phrases = [(kind, count)]
    relation = None
    if at < len(words):
        relation, after = _parse_relation(words, at)
        if relation is None and words[at] != "and":
            relations = ", ".join(repr(p) for p in RELATION_PHRASES.values())
            raise _grammar_error(prompt, at, words, f"the end, 'and' or a relation ({relations})")
        second, second_count, at = _parse_phrase(prompt, words, after if relation else at + 1)
        phrases.append((second, second_count))
        if at < len(words):
            raise _grammar_error(prompt, at, words, "the end of the prompt (at most two phrases)")
        if second == kind:
            raise ShapesGrammarError(
                f"prompt {prompt!r}: names the {kind.colour} {PLURALS[kind.shape]} twice; "
                f"give their number once, e.g. {Kind(kind.colour, kind.shape).phrase(min(count + second_count, 4))!r}"
            )
        if relation and (count > 1 or second_count > 1):
            raise ShapesGrammarError(
                f"prompt {prompt!r}: a relation ({RELATION_PHRASES[relation]!r}) relates two single objects; "
                f"write e.g. {TEMPLATE_EXAMPLES['relation']!r}"
            )
    facts = []
    for phrase_kind, phrase_count in phrases:
        facts.append(Fact("present", phrase_kind))
        if phrase_count > 1:
            facts.append(Fact("count", phrase_kind, count=phrase_count))
    if relation:
        facts.append(Fact("relation", kind, relation=relation, other=phrases[1][0]))
    return ParsedPrompt(tuple(phrases), relation, _template_of(phrases, relation), tuple(facts))


def _template_of(phrases: list[tuple[Kind, int]], relation: str | None) -> str:
    if relation:
        return "relation"
    if len(phrases) == 1:
        return "single" if phrases[0][1] == 1 else "count"
    return "pair" if all(count == 1 for _, count in phrases) else "counted_pair"


def caption(phrases: Sequence[tuple[Kind, int]], relation: str | None = None) -> str:
    """The canonical caption of one or two phrases, joined by 'and' or by a relation."""
    parts = [kind.phrase(count) for kind, count in phrases]
    if len(parts) == 1:
        return parts[0]
    joiner = RELATION_PHRASES[relation] if relation else "and"
    return f"{parts[0]} {joiner} {parts[1]}"


# --- facts on objects ---------------------------------------------------------------------------------------------


def relations_between(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """GenEval's relative position of box a to box b: the relations whose direction the shrunken offset points in."""
    centre_a = np.array([(box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2])
    centre_b = np.array([(box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2])
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]])
    offset = centre_a - centre_b
    norm = float(np.linalg.norm(offset))
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def fact_holds(fact: Fact, objects: Sequence) -> bool:
    """Whether `fact` is true of `objects` (anything with `.kind` and `.box`; the largest one stands for a kind)."""
    matching = [obj for obj in objects if obj.kind == fact.kind]
    if fact.type == "present":
        return bool(matching)
    if fact.type == "count":
        return len(matching) == fact.count
    others = [obj for obj in objects if obj.kind == fact.other]
    if not matching or not others:
        return False
    subject = max(matching, key=_box_area)
    reference = max(others, key=_box_area)
    return fact.relation in relations_between(subject.box, reference.box)


def _box_area(obj) -> float:
    x0, y0, x1, y1 = obj.box
    return (x1 - x0) * (y1 - y0)


# --- prompts and the split ----------------------------------------------------------------------------------------


def all_kinds() -> list[Kind]:
    return [Kind(colour, shape) for colour in COLOURS for shape in SHAPES]


def template_prompts(template: str) -> list[str]:
    """Every caption the renderer draws for one template, in a fixed order."""
    return list(_template_prompts(template))


@functools.cache
def _template_prompts(template: str) -> tuple[str, ...]:
    kinds = all_kinds()
    if template == "single":
        return tuple(caption([(k, 1)]) for k in kinds)
    if template == "count":
        return tuple(caption([(k, n)]) for n in (2, 3, 4) for k in kinds)
    ordered_pairs = [(a, b) for a in kinds for b in kinds if a != b]
    if template == "pair":
        return tuple(caption([(a, 1), (b, 1)]) for a, b in ordered_pairs)
    if template == "counted_pair":
        return tuple(caption([(a, n), (b, m)]) for n, m in COUNTED_PAIRS for a, b in ordered_pairs)
    if template == "relation":
        return tuple(caption([(a, 1), (b, 1)], relation) for relation in RELATIONS for a, b in ordered_pairs)
    raise ValueError(f"template {template!r}: unknown (known: {', '.join(TEMPLATES)})")


def _split_key(prompt: str) -> bytes:
    return hashlib.blake2b(f"{SPLIT_SALT}\x1f{prompt}".encode(), digest_size=8).digest()


def held_out_prompts() -> list[str]:
    """The 100 held-out prompts: per template, the ones with the smallest stable hash (see HELD_OUT_PER_TEMPLATE)."""
    return list(_held_out_prompts())


@functools.cache
def _held_out_prompts() -> tuple[str, ...]:
    held: list[str] = []
    for template in TEMPLATES:
        held += sorted(template_prompts(template), key=_split_key)[: HELD_OUT_PER_TEMPLATE[template]]
    return tuple(held)


def split_prompts(split: str) -> dict[str, list[str]]:
    """Prompts of one split ("train" or "held_out") by template; the two splits are disjoint and cover all."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split {split!r}: unknown (expected 'train' or 'held_out')")
    held = set(_held_out_prompts())
    keep = (lambda p: p in held) if split == "held_out" else (lambda p: p not in held)
    return {template: [p for p in template_prompts(template) if keep(p)] for template in TEMPLATES}


# --- drawing ------------------------------------------------------------------------------------------------------


def _jitter(rgb: tuple[int, int, int], amount: int, rng: np.random.Generator) -> tuple[int, int, int]:
    values = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(values, 0, 255))


def _boxes_clear(box: tuple[float, ...], placed: list[tuple[float, ...]]) -> bool:
    return all(
        box[2] + GAP <= other[0] or other[2] + GAP <= box[0] or box[3] + GAP <= other[1] or other[3] + GAP <= box[1]
        for other in placed
    )


def _box_at(kind: Kind, size: float, x0: float, y0: float) -> tuple[float, float, float, float]:
    height = size * TRIANGLE_HEIGHT if kind.shape == "triangle" else size
    return (x0, y0, x0 + size, y0 + height)


def _random_box(kind: Kind, rng: np.random.Generator) -> tuple[float, float, float, float]:
    size = float(rng.integers(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE + 1))
    width, height = size, size * (TRIANGLE_HEIGHT if kind.shape == "triangle" else 1.0)
    x0 = float(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - int(math.ceil(width)) + 1))
    y0 = float(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - int(math.ceil(height)) + 1))
    return _box_at(kind, size, x0, y0)


def _inside(box: tuple[float, ...]) -> bool:
    return box[0] >= MARGIN and box[1] >= MARGIN and box[2] <= IMAGE_SIZE - MARGIN and box[3] <= IMAGE_SIZE - MARGIN


def _layout(kinds: list[Kind], relation: str | None, rng: np.random.Generator) -> list[SceneObject]:
    """Non-touching boxes for `kinds`; with a relation, the first object lies clearly that side of the second."""
    for _attempt in range(1000):
        placed: list[SceneObject] = []
        for index, kind in enumerate(kinds):
            for _try in range(100):
                if relation and index == 1:
                    box = _relative_box(kind, placed[0], relation, rng)
                else:
                    box = _random_box(kind, rng)
                if box is not None and _inside(box) and _boxes_clear(box, [obj.box for obj in placed]):
                    placed.append(SceneObject(kind, box))
                    break
            else:
                break
        if len(placed) == len(kinds):
            if relation and relation not in relations_between(placed[0].box, placed[1].box):
                continue
            return placed
    raise RuntimeError(f"could not lay out {len(kinds)} objects without overlap; this is a bug in the layout")


def _relative_box(kind: Kind, subject: SceneObject, relation: str, rng: np.random.Generator):
    """A box for the reference object such that `subject` lies `relation` it, within RELATION_MAX_ANGLE of the axis."""
    size = float(rng.integers(MIN_OBJECT_SIZE, MAX_OBJECT_SIZE + 1))
    height = size * (TRIANGLE_HEIGHT if kind.shape == "triangle" else 1.0)
    # The direction from the reference to the subject: subject left of reference means the reference is to the right.
    direction = {"left of": 0.0, "right of": 180.0, "above": 90.0, "below": 270.0}[relation]
    angle = math.radians(direction + rng.uniform(-RELATION_MAX_ANGLE, RELATION_MAX_ANGLE))
    distance = rng.uniform(0.5 * (size + subject.box[2] - subject.box[0]) + GAP + 2, IMAGE_SIZE * 0.8)
    sx, sy = subject.centre
    cx, cy = sx + distance * math.cos(angle), sy + distance * math.sin(angle)  # y down: 90 degrees is below
    return (cx - size / 2, cy - height / 2, cx + size / 2, cy + height / 2)


def draw(objects: Sequence[SceneObject], background: tuple[int, int, int], colours: Sequence[tuple[int, int, int]],
         size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (size, size, 3) image of flat objects (boxes in 64-pixel units) on a plain background."""
    scale = SUPERSAMPLE * size / IMAGE_SIZE
    canvas = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), background)
    pen = ImageDraw.Draw(canvas)
    for obj, colour in zip(objects, colours):
        x0, y0, x1, y1 = (round(v * scale) for v in obj.box)
        # PIL's boxes include their last pixel, so a box of width w spans x0 .. x0 + w - 1.
        if obj.kind.shape == "circle":
            pen.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif obj.kind.shape == "square":
            pen.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def draw_scene(prompt: str, rng: np.random.Generator) -> Scene:
    """A random scene showing exactly what `prompt` says (no other objects), drawn with `rng`."""
    parsed = parse_prompt(prompt)
    kinds = [kind for kind, count in parsed.phrases for _ in range(count)]
    if len(kinds) > MAX_OBJECTS:
        raise ValueError(f"prompt {prompt!r}: {len(kinds)} objects; scenes hold at most {MAX_OBJECTS}")
    objects = _layout(kinds, parsed.relation, rng)
    # Shuffle drawing order so that list position never encodes which phrase an object came from.
    order = rng.permutation(len(objects))
    objects = [objects[i] for i in order]
    background_name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    background = _jitter(BACKGROUNDS[background_name], BACKGROUND_JITTER, rng)
    colours = [_jitter(COLOURS[obj.kind.colour], OBJECT_JITTER, rng) for obj in objects]
    image = draw(objects, background, colours)
    return Scene(image, caption(parsed.phrases, parsed.relation), parsed.template, parsed.facts, tuple(objects),
                 background)


def random_prompt(rng: np.random.Generator, split: str = "train", templates: dict[str, list[str]] | None = None) -> str:
    """A prompt of `split`: a template by TEMPLATE_WEIGHTS, then one of its prompts uniformly."""
    templates = templates or split_prompts(split)
    names = [name for name in TEMPLATES if templates[name]]
    weights = np.array([TEMPLATE_WEIGHTS[name] for name in names])
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    return templates[name][int(rng.integers(len(templates[name])))]


def scenes(seed: int, split: str = "train") -> Iterator[Scene]:
    """Endless scenes of one split's prompts, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    templates = split_prompts(split)
    while True:
        yield draw_scene(random_prompt(rng, templates=templates), rng)
