"""Tag-style caption processing as sd-scripts does it: fixed leading (and trailing) tags, shuffling, tag dropout.

A caption like ``"1girl, solo, red hair, smile"`` is a list of tags split at ``separator``. The first
``keep_tokens`` tags (or everything before ``keep_tokens_separator``, and everything after its second occurrence)
stay in place; the others are shuffled and each dropped with probability ``tag_dropout_rate``. The random choices come
from the generator passed in, which the epoch plan seeds from (seed, epoch), so a resumed run sees the same captions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class CaptionRules:
    """How one subset's captions are turned into training text (sd-scripts' option names without the prefix).

    ``dropout_rate`` (whole caption replaced by ``""``) is drawn by the epoch plan, not here.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    separator: str = ","
    tag_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    prefix: Optional[str] = None
    suffix: Optional[str] = None

    @property
    def is_random(self) -> bool:
        """Whether the text of a caption changes from one showing to the next (shuffling or tag dropout)."""
        return self.shuffle or self.tag_dropout_rate > 0

    def fixed(self) -> "CaptionRules":
        """The same rules without their random parts: what validation and text-encoder caches see."""
        return replace(self, shuffle=False, tag_dropout_rate=0.0, dropout_rate=0.0)


def _tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def split_tags(caption: str, rules: CaptionRules) -> tuple[list[str], list[str], list[str]]:
    """(fixed leading tags, flexible tags, fixed trailing tags) of ``caption`` under ``rules``.

    With ``keep_tokens_separator`` present in the caption, the text before it is fixed, and a second occurrence marks
    fixed trailing tags (``keep_tokens`` is then ignored, as in sd-scripts); otherwise the first ``keep_tokens`` tags
    are fixed.
    """
    marker = rules.keep_tokens_separator
    if marker and marker in caption:
        head, flexible = caption.split(marker, 1)
        tail = ""
        if marker in flexible:
            flexible, tail = flexible.split(marker, 1)
        return _tags(head, rules.separator), _tags(flexible, rules.separator), _tags(tail, rules.separator)
    tags = [tag.strip() for tag in caption.strip().split(rules.separator)]
    return tags[: rules.keep_tokens], tags[rules.keep_tokens :], []


def process_caption(caption: str, rules: CaptionRules, rng: Optional[np.random.Generator] = None) -> str:
    """The training text of ``caption``: prefix/suffix added, then (when the rules shuffle or drop tags) the flexible
    tags shuffled with ``rng`` and each dropped with probability ``tag_dropout_rate``, joined with ``", "``.

    ``rng`` may be None only for rules without random parts.
    """
    if rules.prefix:
        caption = f"{rules.prefix} {caption}"
    if rules.suffix:
        caption = f"{caption} {rules.suffix}"
    if not rules.is_random:
        return caption
    if rng is None:
        raise ValueError("shuffling or tag dropout needs a random generator")
    head, flexible, tail = split_tags(caption, rules)
    if rules.shuffle:
        flexible = [flexible[i] for i in rng.permutation(len(flexible))]
    if rules.tag_dropout_rate > 0:
        keep = rng.random(len(flexible)) >= rules.tag_dropout_rate
        flexible = [tag for tag, kept in zip(flexible, keep) if kept]
    return ", ".join(head + flexible + tail)
