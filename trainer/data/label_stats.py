"""Label stats: AutoML's "basic analysis of your dataset", and its advice on whether the dataset
is adequate for training.

Counted from the rows a dataset holds (trainer/data/dataset_rows.py), for any task: per label,
its examples (distinct images or videos) in each split as the rows' ML_USE says (TRAIN,
VALIDATION, TEST, UNASSIGNED), and for boxes their number. The advice is AutoML's:

- TOO_FEW_EXAMPLES: at least 10 examples a label;
- FEW_EXAMPLES: 100 or more a label are recommended;
- IMBALANCED: the most common label at most 100 times the least common;
- SMALL_BOXES: boxes at least 8 pixels and 0.01 of the image's side (boxes under 0.01 are
  refused at import, as a training skips them; they are counted here all the same);
- CROWDED_IMAGES: at most 500 boxes an image;
- NOT_TRAINABLE: what the training's own dataset check would refuse (a label without TRAIN
  examples, no VALIDATION or TEST examples, fewer than two labels).

Each piece of advice names the labels it concerns. The dataset is ``adequate`` when none of
TOO_FEW_EXAMPLES and NOT_TRAINABLE applies: the others are recommendations.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

from trainer.data.dataset_rows import ImportRow

MIN_EXAMPLES = 10
RECOMMENDED_EXAMPLES = 100
MAX_IMBALANCE = 100
MIN_BOX_PIXELS = 8
MIN_BOX_FRACTION = 0.01
MAX_BOXES_PER_IMAGE = 500
SPLITS = ("TRAIN", "VALIDATION", "TEST", "UNASSIGNED")
SMALL_BOXES, CROWDED = "SMALL_BOXES", "CROWDED_IMAGES"
BLOCKING = ("TOO_FEW_EXAMPLES", "NOT_TRAINABLE")  # advice that a training would fail on
NAMED = 10  # labels a message names before "and N more"


def label_stats(
    rows: list[ImportRow],
    facts: dict[str, dict[str, Any]],
    unit: str,
    trainable: str | None,
    refused: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """The stats and advice of ``rows`` (``facts``: each file's, by path; ``trainable``: why
    the training's check refuses the rows, or None; ``refused``: per advice, the boxes an
    import refused, by label)."""
    split_of: dict[str, str] = {}
    examples: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    boxes: Counter[str] = Counter()
    for row in rows:
        split = split_of.setdefault(str(row.path), row.ml_use)  # an image's first row decides
        for label in row.labels:
            examples[label][split].add(str(row.path))
        if row.box is not None:
            boxes.update(row.labels)
    labels = [_label(name, examples[name], boxes) for name in sorted(examples)]
    if not any(row.box for row in rows):
        for entry in labels:
            entry.pop("boxes")
    advice = _advice(labels, unit, trainable)
    advice += _box_advice(rows, facts, refused)
    return {
        "unit": unit,
        "exampleCount": len(split_of),
        "splits": {split: Counter(split_of.values())[split] for split in SPLITS},
        "labels": labels,
        "advice": advice,
        "adequate": not any(item["code"] in BLOCKING for item in advice),
        "refused": refused,
    }


def _label(name: str, by_split: dict[str, set[str]], boxes: Counter[str]) -> dict[str, Any]:
    counts = {split: len(by_split.get(split, ())) for split in SPLITS}
    total = len(set().union(*by_split.values())) if by_split else 0
    return {"displayName": name, "exampleCount": total, "splits": counts, "boxes": boxes[name]}


def advice_item(code: str, labels: list[str], message: str) -> dict[str, Any]:
    return {"code": code, "labels": labels, "message": message}


def _advice(labels: list[dict[str, Any]], unit: str, trainable: str | None) -> list[dict]:
    counts = {entry["displayName"]: entry["exampleCount"] for entry in labels}
    advice = []
    if trainable:
        named = [label for label in counts if _names(trainable, label)]
        advice.append(advice_item("NOT_TRAINABLE", named, trainable))
    few = [label for label, n in counts.items() if n < MIN_EXAMPLES]
    if few:
        advice.append(advice_item("TOO_FEW_EXAMPLES", few, (
            f"{_listed(few, counts, unit + 's')} {_have(few)} fewer than {MIN_EXAMPLES} {unit}s: "
            f"AutoML needs at least {MIN_EXAMPLES} a label"
        )))  # fmt: skip
    some = [label for label, n in counts.items() if MIN_EXAMPLES <= n < RECOMMENDED_EXAMPLES]
    if some:
        advice.append(advice_item("FEW_EXAMPLES", some, (
            f"{_listed(some, counts, unit + 's')} {_have(some)} fewer than {RECOMMENDED_EXAMPLES} "
            f"{unit}s: {RECOMMENDED_EXAMPLES} or more a label are recommended"
        )))  # fmt: skip
    if counts:
        most = max(counts, key=lambda label: counts[label])
        rare = [label for label, n in counts.items() if n * MAX_IMBALANCE < counts[most]]
        if rare:
            advice.append(advice_item("IMBALANCED", [most, *rare], (
                f"the most common label, {most} ({counts[most]} {unit}s), has more than "
                f"{MAX_IMBALANCE} times the {unit}s of {_listed(rare, counts, unit + 's')}: "
                f"keep the most common label at most {MAX_IMBALANCE} times the least common"
            )))  # fmt: skip
    return advice


def _box_advice(
    rows: list[ImportRow], facts: dict[str, dict[str, Any]], refused: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    small: Counter[str] = Counter(refused.get(SMALL_BOXES, {}))
    per_image: Counter[str] = Counter()
    for row in rows:
        if row.box is None:
            continue
        per_image[str(row.path)] += 1
        width, height = facts.get(str(row.path), {}).get("size", (0, 0))
        x_min, y_min, x_max, y_max = row.box
        if width and min((x_max - x_min) * width, (y_max - y_min) * height) < MIN_BOX_PIXELS:
            small.update(row.labels)
    advice = []
    if small:
        labels = sorted(small)
        advice.append(advice_item(SMALL_BOXES, labels, (
            f"{_listed(labels, small, 'boxes')} {_have(labels)} boxes under {MIN_BOX_PIXELS} "
            f"pixels or {MIN_BOX_FRACTION} of the image's side (those under {MIN_BOX_FRACTION} "
            "were refused at import): objects that small are hard to detect"
        )))  # fmt: skip
    crowded = {path for path, n in per_image.items() if n > MAX_BOXES_PER_IMAGE}
    if crowded:
        labels = sorted({label for row in rows if str(row.path) in crowded for label in row.labels})
        advice.append(advice_item(CROWDED, labels, (
            f"{len(crowded)} image(s) have more than {MAX_BOXES_PER_IMAGE} boxes (labels "
            f"{_names_of(labels)}): AutoML takes at most {MAX_BOXES_PER_IMAGE} an image"
        )))  # fmt: skip
    return advice


def _listed(labels: list[str], counts: Any, units: str) -> str:
    """``labels a (3 images), b (5)``, the first NAMED of them."""
    shown = [f"{label} ({counts[label]}{' ' + units if i == 0 else ''})"
             for i, label in enumerate(labels[:NAMED])]  # fmt: skip
    more = f" and {len(labels) - NAMED} more" if len(labels) > NAMED else ""
    return f"label{'s' if len(labels) > 1 else ''} {', '.join(shown)}{more}"


def _names_of(labels: list[str]) -> str:
    more = f" and {len(labels) - NAMED} more" if len(labels) > NAMED else ""
    return ", ".join(labels[:NAMED]) + more


def _have(labels: list[str]) -> str:
    return "have" if len(labels) > 1 else "has"


def _names(message: str, label: str) -> bool:
    """Whether a message names ``label`` as a word (labels are letters, digits and _)."""
    return re.search(rf"(?<![\w]){re.escape(label)}(?![\w])", message) is not None
