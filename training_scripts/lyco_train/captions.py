"""Tag-style caption processing as sd-scripts does it: fixed leading (and trailing) tags, shuffling, tag dropout.

A caption like ``"1girl, solo, red hair, smile"`` is a list of tags split at ``separator``. The first
``keep_tokens`` tags (or everything before ``keep_tokens_separator``, and everything after its second occurrence)
stay in place; the others are shuffled and each dropped with probability ``tag_dropout_rate``. With ``wildcard``, a
multi-line caption trains on one of its lines and ``{a|b|c}`` on one of its options. The random choices come from the
generator passed in, which the epoch plan seeds from (seed, epoch), so a resumed run sees the same captions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class CaptionRules:
    """How one subset's captions are turned into training text (sd-scripts' option names without the prefix).

    ``dropout_rate`` and ``dropout_every_n_epochs`` (whole caption replaced by ``""``) are applied by the epoch plan,
    not here. ``secondary_separator`` becomes ``separator`` after shuffling and dropout (tags joined by it move and
    drop together).
    """

    shuffle: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    separator: str = ","
    tag_dropout_rate: float = 0.0
    dropout_rate: float = 0.0
    prefix: str | None = None
    suffix: str | None = None
    secondary_separator: str | None = None
    wildcard: bool = False
    dropout_every_n_epochs: int = 0

    @property
    def is_random(self) -> bool:
        """Whether the text of a caption changes from one showing to the next (shuffling, tag dropout, wildcards)."""
        return self.shuffle or self.tag_dropout_rate > 0 or self.wildcard

    def fixed(self) -> CaptionRules:
        """The same rules without their random parts: what validation and text-encoder caches see (wildcards resolve
        to the first line and the first options)."""
        return replace(self, shuffle=False, tag_dropout_rate=0.0, dropout_rate=0.0, dropout_every_n_epochs=0)


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


WILDCARD = re.compile(r"\{([^}]+)\}")


def resolve_wildcards(caption: str, rng: np.random.Generator | None) -> str:
    """sd-scripts' wildcards: one line of a multi-line caption, then every ``{a|b|c}`` replaced by one option (``{{``
    and ``}}`` stay literal braces); chosen with ``rng``, or the first line and first options when it is None."""
    lines = caption.split("\n")
    caption = lines[0] if rng is None else lines[int(rng.integers(len(lines)))]
    opening, closing = "⦅", "⦆"
    while opening in caption or closing in caption:
        opening, closing = opening + "⦅", closing + "⦆"
    caption = caption.replace("{{", opening).replace("}}", closing)

    def choose(match: re.Match) -> str:
        options = match.group(1).split("|")
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    return WILDCARD.sub(choose, caption).replace(opening, "{").replace(closing, "}")


def process_caption(caption: str, rules: CaptionRules, rng: np.random.Generator | None = None) -> str:
    """The training text of ``caption``: wildcards resolved (with ``wildcard``), prefix/suffix added, then (when the
    rules shuffle or drop tags) the flexible tags shuffled with ``rng`` and each dropped with probability
    ``tag_dropout_rate``, joined with ``", "``; finally ``secondary_separator`` replaced by ``separator``.

    ``rng`` may be None only for rules that neither shuffle nor drop tags (wildcards then take their first choices).
    """
    if rules.wildcard:
        caption = resolve_wildcards(caption, rng)
    if rules.prefix:
        caption = f"{rules.prefix} {caption}"
    if rules.suffix:
        caption = f"{caption} {rules.suffix}"
    if rules.shuffle or rules.tag_dropout_rate > 0:
        if rng is None:
            raise ValueError("shuffling or tag dropout needs a random generator")
        caption = _shuffle_and_drop(caption, rules, rng)
    if rules.secondary_separator:
        caption = caption.replace(rules.secondary_separator, rules.separator)
    return caption


def _shuffle_and_drop(caption: str, rules: CaptionRules, rng: np.random.Generator) -> str:
    head, flexible, tail = split_tags(caption, rules)
    if rules.shuffle:
        flexible = [flexible[i] for i in rng.permutation(len(flexible))]
    if rules.tag_dropout_rate > 0:
        keep = rng.random(len(flexible)) >= rules.tag_dropout_rate
        flexible = [tag for tag, kept in zip(flexible, keep) if kept]
    return ", ".join(head + flexible + tail)
