"""One place that turns an item's fields into the text the frozen encoder reads."""

from __future__ import annotations

from typing import Iterable, Optional

# Characters kept per field before tokenization. The tokenizer truncates to the
# model's token budget anyway; this cap only keeps a 10 MB field from costing
# seconds of tokenizer time.
MAX_FIELD_CHARS = 4000


def item_text(
    title: str,
    description: str = "",
    category: str = "",
    brand: str = "",
    tags: Iterable[str] = (),
    price: Optional[float] = None,
) -> str:
    """Render item fields as one short document, most informative field first."""
    parts = [_clip(title)]
    if category:
        parts.append(f"Category: {_clip(category)}.")
    if brand:
        parts.append(f"By {_clip(brand)}.")
    tag_list = [t for t in tags if t]
    if tag_list:
        parts.append("Tags: " + _clip(", ".join(tag_list)) + ".")
    if price is not None:
        parts.append(f"Price: {price:.2f}.")
    if description:
        parts.append(_clip(description))
    return " ".join(p for p in parts if p)


def _clip(text: str) -> str:
    return text.strip()[:MAX_FIELD_CHARS]
