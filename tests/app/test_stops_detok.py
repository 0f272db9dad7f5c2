"""Unit tests of the stop matcher (app/engine/stops.py) and the incremental detokenizer's UTF-8 hold-back."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.stops import StopMatcher


def feed(stops: list[str], deltas: list[str]) -> tuple[StopMatcher, list[str]]:
    matcher = StopMatcher(stops)
    shown = []
    for delta in deltas:
        shown.append(matcher.push(delta))
        if matcher.stopped:
            break
    return matcher, shown


def test_stop_split_across_several_tokens_is_cut_and_never_shown():
    matcher, shown = feed(["###"], ["Hello #", "#", "#", " more"])
    assert matcher.stopped
    assert matcher.text == "Hello "
    # "#" and "##" are held back, then dropped with the stop; matched on the third token
    assert shown == ["Hello ", "", ""]


def test_partial_match_is_held_back_then_released():
    matcher, shown = feed(["STOP"], ["go S", "T", "x", " on"])
    assert not matcher.stopped
    assert shown == ["go ", "", "STx", " on"]
    assert matcher.text == "go STx on"


def test_held_back_tail_is_released_by_flush_when_the_sequence_ends_otherwise():
    matcher, shown = feed(["STOP"], ["end ST"])
    assert shown == ["end "]
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins_and_text_is_cut_before_it():
    # "END" starts before "!!" even though "!!" is complete in an earlier token
    matcher, shown = feed(["!!", "END"], ["a E", "N", "D b!!"])
    assert matcher.stopped and matcher.text == "a "
    matcher, shown = feed(["!!", "END"], ["x!!yEND"])
    assert matcher.text == "x" and shown == ["x"]


def test_hold_back_covers_the_longest_prefix_of_any_stop():
    matcher, shown = feed(["ab", "wxyz"], ["1wxy"])
    assert shown == ["1"]  # "wxy" may still become "wxyz"
    assert matcher.push("a") == "wxy"  # it did not; "a" may start "ab"
    assert matcher.push("b") == ""
    assert matcher.stopped and matcher.text == "1wxy"


@pytest.mark.parametrize("split", [1, 2, 3, 5])
def test_visible_text_adds_up_to_the_cut_text_however_split(split):
    full = "one STO two STOP three"
    deltas = [full[i : i + split] for i in range(0, len(full), split)]
    matcher, shown = feed(["STOP"], deltas)
    assert matcher.stopped
    assert "".join(shown) + matcher.flush() == matcher.text == "one STO two "


# --- the detokenizer ------------------------------------------------------------

TEXT = "café naïve 🙂 ok — ünïcödé 日本"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_multibyte_characters_split_across_tokens_never_stream_a_replacement_char(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # the byte-level vocabulary splits these characters: some tokens alone are not valid UTF-8
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some tokens were held back until their character completed
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT


def test_emoji_is_emitted_whole_on_its_last_byte(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # one token per byte (or several bytes) of the 4-byte character
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_long_stream_matches_decode(tokenizer):
    ids = tokenizer((TEXT + " and some ascii text\n") * 5, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert "".join(detokenizer.push(i) for i in ids) == tokenizer.decode(ids)
