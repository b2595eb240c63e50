"""Tag-style captions: shuffling per epoch and per repeat, kept tags, tag dropout rate, determinism from the seed."""

import math
from pathlib import Path

import numpy as np
import pytest
from lyco_train.batches import EpochPlan, caption_text
from lyco_train.captions import CaptionRules, process_caption, split_tags
from lyco_train.data import ImageRecord, Subset

TAGS = [f"tag{i}" for i in range(12)]


def _plan(rules: CaptionRules, *, seed: int, repeats: int = 4) -> tuple[EpochPlan, list[ImageRecord]]:
    subset = Subset(Path("."), captions=rules, batch_size=1)
    records = [ImageRecord(Path("a.png"), ", ".join(TAGS), repeats, (32, 32), subset)]
    return EpochPlan(records, [(32, 32)], seed=seed), records


def _captions(plan: EpochPlan, records, epoch: int) -> list[str]:
    return [caption_text(records[s.record], s) for batch in plan.batches(epoch) for s in batch]


def test_shuffle_differs_per_epoch_and_repeat_and_repeats_exactly_for_a_seed():
    rules = CaptionRules(shuffle=True, keep_tokens=2)
    plan, records = _plan(rules, seed=7)
    first, second = _captions(plan, records, 0), _captions(plan, records, 1)
    assert len(first) == 4 and len(set(first)) == 4  # every repeat of the image gets its own order
    assert first != second  # and every epoch
    again, _ = _plan(rules, seed=7)
    assert _captions(again, records, 0) == first and _captions(again, records, 1) == second  # resume sees the same
    other, _ = _plan(rules, seed=8)
    assert _captions(other, records, 0) != first
    for caption in first + second:
        tags = caption.split(", ")
        assert tags[:2] == TAGS[:2]  # the kept tags stay first
        assert sorted(tags[2:]) == sorted(TAGS[2:])  # the rest is a permutation: nothing lost, nothing added


def test_keep_tokens_separator_fixes_head_and_tail_and_overrides_keep_tokens():
    rules = CaptionRules(shuffle=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "artist, 1girl ||| red hair, smile, sky, tree, hat ||| masterpiece, best quality"
    assert split_tags(caption, rules) == (
        ["artist", "1girl"],
        ["red hair", "smile", "sky", "tree", "hat"],
        ["masterpiece", "best quality"],
    )
    orders = set()
    for seed in range(20):
        tags = process_caption(caption, rules, np.random.default_rng(seed)).split(", ")
        assert tags[:2] == ["artist", "1girl"] and tags[-2:] == ["masterpiece", "best quality"]
        orders.add(tuple(tags[2:-2]))
    assert len(orders) > 10  # the middle is really shuffled (5! = 120 orders)


def test_tag_dropout_rate_matches_binomial_and_never_drops_kept_tags():
    rate, shown, flexible = 0.3, 4000, 10
    rules = CaptionRules(tag_dropout_rate=rate, keep_tokens=1, separator=";")
    caption = ";".join(["keep"] + [f"t{i}" for i in range(flexible)])
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(shown):
        tags = process_caption(caption, rules, rng).split(", ")
        assert tags[0] == "keep"
        assert tags[1:] == [t for t in (f"t{i}" for i in range(flexible)) if t in tags]  # no shuffle: order kept
        kept += len(tags) - 1
    trials = shown * flexible
    dropped = 1 - kept / trials
    tolerance = 5 * math.sqrt(rate * (1 - rate) / trials)  # five binomial standard deviations (about 0.011)
    assert abs(dropped - rate) < tolerance, (dropped, tolerance)


def test_fixed_rules_leave_the_caption_as_written_with_prefix_and_suffix():
    rules = CaptionRules(keep_tokens=1, prefix="sks style,", suffix=", night")
    assert process_caption("a,b ,  c", rules) == "sks style, a,b ,  c , night"  # not re-joined without randomness
    assert process_caption("a, b", CaptionRules(shuffle=True).fixed()) == "a, b"
    with pytest.raises(ValueError, match="random generator"):
        process_caption("a, b", CaptionRules(shuffle=True))


def test_caption_choices_leave_the_other_draws_of_an_epoch_unchanged():
    """Turning shuffling on for a subset must not change which images, flips and drops a seed gives."""
    plain, records = _plan(CaptionRules(), seed=3)
    shuffled, _ = _plan(CaptionRules(shuffle=True), seed=3)
    strip = [[(s.record, s.flip, s.drop_caption) for s in batch] for batch in plain.batches(0)]
    assert strip == [[(s.record, s.flip, s.drop_caption) for s in batch] for batch in shuffled.batches(0)]


def test_secondary_separator_keeps_joined_tags_together_then_becomes_the_separator():
    rules = CaptionRules(shuffle=True, tag_dropout_rate=0.2, secondary_separator="$$")
    caption = "a, b$$c, d, e, f"
    seen_orders, seen_drops = set(), 0
    for seed in range(60):
        text = process_caption(caption, rules, np.random.default_rng(seed))
        tags = text.split(", ")
        assert "$$" not in text and all(tag in {"a", "b,c", "d", "e", "f"} for tag in tags)
        seen_orders.add(tuple(tags))
        seen_drops += "b,c" not in tags
    assert len(seen_orders) > 20 and 0 < seen_drops < 60  # the pair moves and drops as one tag


def test_wildcards_pick_lines_and_options_and_fixed_form_takes_the_first():
    rules = CaptionRules(wildcard=True)
    caption = "x {red|blue} y {{literal}}\nanother line"
    assert process_caption(caption, rules) == "x red y {literal}"  # validation / text-cache form
    rng = np.random.default_rng(0)
    seen = {process_caption(caption, rules, rng) for _ in range(200)}
    assert seen == {"x red y {literal}", "x blue y {literal}", "another line"}
    assert CaptionRules(wildcard=True).is_random and not CaptionRules(wildcard=True).fixed().shuffle


def test_caption_dropout_every_n_epochs_drops_every_caption_of_those_epochs():
    plan, records = _plan(CaptionRules(dropout_every_n_epochs=2, shuffle=True), seed=1)
    for epoch in range(4):
        captions = _captions(plan, records, epoch)
        assert (set(captions) == {""}) == (epoch % 2 == 1)  # sd-scripts counts epochs from 1: epochs 2, 4 drop
