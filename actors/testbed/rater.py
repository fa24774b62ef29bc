"""The `shapes` rater: a GenEval-like programmatic scorer for shape scenes (colour segmentation, shape by fill).

Made by actors/raters/specs.py for the spec `shapes`; the vocabulary and the facts come from actors.testbed.world.

How an image is read: the background is the median colour of the image border; every pixel takes the nearest
palette colour (or the background, or nothing when no palette colour is within COLOUR_TOLERANCE); each colour's
mask is opened with a 3x3 square (so anti-aliased rims and specks vanish) and cut into 4-connected components of
at least MIN_AREA pixels. A component's shape is the nearest prototype in (fill of its box, share of its area in
the top half of its box): squares fill their box, circles fill pi/4 of it, upright triangles half of it with a
quarter in the top half. Facts are then checked on these objects exactly as actors.testbed.world checks them on a
scene's ground truth (box centres, GenEval's position rule).

score = (1 - CLEANLINESS_WEIGHT) * (share of facts satisfied) + CLEANLINESS_WEIGHT * cleanliness, in [0, 1], where
cleanliness is the mean over the prompt's objects of colour purity x shape fit of the largest matching component
(0 for a missing object): a small continuous term so that images satisfying the same facts rarely tie.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from actors.testbed.world import COLOURS, IMAGE_SIZE, Fact, Kind, fact_holds, parse_prompt

COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float32)
# RGB distance beyond which a pixel is no palette colour at all (object colours are >= 95 apart).
COLOUR_TOLERANCE = 110.0
MIN_AREA = 20  # pixels at 64x64 after opening; the smallest drawn object (a 12-pixel triangle) has about 60
BORDER = 2  # pixels of the image frame whose median colour is the background
# (fill of the bounding box, share of the area in the box's top half) of each shape, measured on drawn scenes.
SHAPE_PROTOTYPES = {"square": (0.99, 0.50), "circle": (0.79, 0.50), "triangle": (0.68, 0.33)}
SHAPE_FIT_SCALE = 0.25  # feature distance at which the shape fit reaches 0
CLEANLINESS_WEIGHT = 0.05


@dataclass(frozen=True)
class DetectedObject:
    """A component found in an image: its kind, box (x0, y0, x1, y1), pixel area and how cleanly it is drawn."""

    kind: Kind
    box: tuple[float, float, float, float]
    area: int
    colour_purity: float  # 1 = exactly the palette colour, 0 = at the tolerance
    shape_fit: float  # 1 = exactly the prototype's features

    @property
    def quality(self) -> float:
        return self.colour_purity * self.shape_fit


@dataclass(frozen=True)
class Rating:
    """One image's verdict: each fact with whether it holds, the share satisfied, cleanliness and the score."""

    facts: tuple[Fact, ...]
    satisfied: tuple[bool, ...]
    fraction: float
    cleanliness: float
    score: float
    objects: tuple[DetectedObject, ...]


def _as_working_size(image: np.ndarray) -> np.ndarray:
    """The image at 64x64 (the scale MIN_AREA and the opening are set for), float32 RGB."""
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        image = np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return image.astype(np.float32)


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the outer BORDER pixels of an (H, W, 3) image."""
    frame = np.concatenate([
        image[:BORDER].reshape(-1, 3), image[-BORDER:].reshape(-1, 3),
        image[:, :BORDER].reshape(-1, 3), image[:, -BORDER:].reshape(-1, 3),
    ])
    return np.median(frame, axis=0)


def colour_classes(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class map, distance map): per pixel the index of the nearest palette colour, or -1 for background/none."""
    distances = np.linalg.norm(image[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, colours)
    nearest = distances.argmin(axis=-1)
    nearest_distance = distances.min(axis=-1)
    background_distance = np.linalg.norm(image - background_colour(image), axis=-1)
    is_object = (nearest_distance < COLOUR_TOLERANCE) & (nearest_distance < background_distance)
    return np.where(is_object, nearest, -1), nearest_distance


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def open_mask(mask: np.ndarray) -> np.ndarray:
    """Binary opening with a 3x3 square: removes parts thinner than 3 pixels, keeps the rest's outline."""
    return _dilate(_erode(mask)) & mask


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask: -1 outside, else the smallest flat pixel index of the component."""
    height, width = mask.shape
    outside = height * width
    labels = np.where(mask, np.arange(outside).reshape(height, width), outside)
    while True:
        smallest = labels.copy()
        np.minimum(smallest[1:], labels[:-1], out=smallest[1:])
        np.minimum(smallest[:-1], labels[1:], out=smallest[:-1])
        np.minimum(smallest[:, 1:], labels[:, :-1], out=smallest[:, 1:])
        np.minimum(smallest[:, :-1], labels[:, 1:], out=smallest[:, :-1])
        smallest = np.where(mask, smallest, outside)
        # Pointer jumping: a label is a pixel of the same component, so that pixel's label is one too.
        flat = np.append(smallest.ravel(), outside)
        smallest = np.where(mask, flat[smallest], outside)
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    return np.where(mask, labels, -1)


def shape_features(component: np.ndarray) -> tuple[float, float, tuple[int, int, int, int]]:
    """(fill of the bounding box, share of the area in the box's top half, box) of a boolean component mask."""
    rows, cols = np.nonzero(component)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    area = len(rows)
    fill = area / float((y1 - y0) * (x1 - x0))
    # Rows are weighted by how much of them lies above the box's mid-height (odd heights split the middle row).
    middle = (y0 + y1) / 2.0
    weights = np.clip(middle - rows, 0.0, 1.0)
    top = float(weights.sum()) / area
    return fill, top, (int(x0), int(y0), int(x1), int(y1))


def classify_shape(fill: float, top: float) -> tuple[str, float]:
    """(nearest shape prototype, fit in [0, 1]) for a component's features."""
    distances = {
        shape: float(np.hypot(fill - proto_fill, 2.0 * (top - proto_top)))
        for shape, (proto_fill, proto_top) in SHAPE_PROTOTYPES.items()
    }
    shape = min(distances, key=distances.get)
    return shape, max(0.0, 1.0 - distances[shape] / SHAPE_FIT_SCALE)


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """The flat objects in one (H, W, 3) uint8 image, largest first."""
    pixels = _as_working_size(image)
    classes, distance = colour_classes(pixels)
    found: list[DetectedObject] = []
    for colour_index, colour in enumerate(COLOUR_NAMES):
        mask = open_mask(classes == colour_index)
        if mask.sum() < MIN_AREA:
            continue
        labels = label_components(mask)
        ids, counts = np.unique(labels[mask], return_counts=True)
        for label, count in zip(ids, counts):
            if count < MIN_AREA:
                continue
            component = labels == label
            fill, top, box = shape_features(component)
            shape, fit = classify_shape(fill, top)
            purity = float(np.clip(1.0 - distance[component].mean() / COLOUR_TOLERANCE, 0.0, 1.0))
            found.append(DetectedObject(Kind(colour, shape), tuple(float(v) for v in box), int(count), purity, fit))
    return sorted(found, key=lambda obj: -obj.area)


def rate(image: np.ndarray, prompt: str) -> Rating:
    """Check each fact of `prompt` on `image`; raises actors.testbed.world.ShapesGrammarError outside the grammar."""
    parsed = parse_prompt(prompt)
    objects = detect_objects(image)
    satisfied = tuple(fact_holds(fact, objects) for fact in parsed.facts)
    fraction = sum(satisfied) / len(satisfied)
    qualities = []
    for kind, _count in parsed.phrases:
        matching = [obj for obj in objects if obj.kind == kind]
        qualities.append(max(matching, key=lambda obj: obj.area).quality if matching else 0.0)
    cleanliness = float(np.mean(qualities))
    score = (1.0 - CLEANLINESS_WEIGHT) * fraction + CLEANLINESS_WEIGHT * cleanliness
    return Rating(parsed.facts, satisfied, fraction, cleanliness, float(score), tuple(objects))


class ShapesRater:
    """Scores shape scenes for shapes-grammar prompts: share of facts satisfied plus a small cleanliness term."""

    def __init__(self, name: str = "shapes") -> None:
        self.name = name

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        from actors.raters.images import check_image_batch

        check_image_batch(images, prompts)
        return np.array([rate(image, prompt).score for image, prompt in zip(images, prompts)], dtype=np.float32)

