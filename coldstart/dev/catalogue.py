"""The demo catalogue shipped with the package (data/catalogue.jsonl): items and their text."""

from __future__ import annotations

import json
import random
from importlib import resources

from encoders.text import item_text


def load_catalogue(limit: int = 0) -> list[dict]:
    """The shipped catalogue in a fixed shuffled order, so any prefix mixes categories."""
    text = resources.files("coldstart.dev").joinpath("data/catalogue.jsonl").read_text(encoding="utf-8")
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
    random.Random(0).shuffle(items)
    return items[:limit] if limit else items


def catalogue_texts(count: int) -> list[str]:
    """`count` texts, cycling through the catalogue (0: each item's once)."""
    items = load_catalogue()
    texts = [item_text(i["title"], i["description"], i["category"], i["brand"], i["tags"], i["price"]) for i in items]
    return [texts[i % len(texts)] for i in range(count or len(texts))]
