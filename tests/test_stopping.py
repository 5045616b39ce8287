"""Tests for expertmesh.stopping: streamed stop-string matching against the one-line definition."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.stopping import StopMatcher


def reference(text: str, stop: list[str]) -> str:
    """The definition: cut before the earliest occurrence of any stop string."""
    starts = [text.find(s) for s in stop if s in text]
    return text[: min(starts)] if starts else text


def longest_held_suffix(text: str, stop: list[str]) -> str:
    """The longest suffix of `text` that is a proper prefix of some stop string."""
    for n in range(len(text), 0, -1):
        if any(len(s) > n and s.startswith(text[-n:]) for s in stop):
            return text[-n:]
    return ""


def stream(deltas: list[str], stop: list[str]) -> tuple[list[str], bool]:
    """Push deltas until stopped, else flush; returns the emitted chunks and whether it stopped."""
    matcher = StopMatcher(stop)
    chunks = []
    for delta in deltas:
        out, stopped = matcher.push(delta)
        chunks.append(out)
        if stopped:
            return chunks, True
    chunks.append(matcher.flush())
    assert matcher.text == "".join(chunks)
    return chunks, matcher.stopped


def test_stop_inside_one_delta():
    assert stream(["Hello</s>world"], ["</s>"]) == (["Hello"], True)


def test_stop_spanning_deltas():
    chunks, stopped = stream(["Hel", "lo<", "/", "s", ">world"], ["</s>"])
    assert stopped and chunks == ["Hel", "lo", "", "", ""]


def test_stop_at_very_start():
    assert stream(["STOP", " more"], ["STOP"]) == ([""], True)
    assert stream(["ST", "OP"], ["STOP"]) == (["", ""], True)


def test_overlapping_candidates_earliest_start_wins():
    # "b" is found first in the stream but "ab" starts earlier.
    chunks, stopped = stream(["xa", "b"], ["b", "ab"])
    assert stopped and "".join(chunks) == "x"
    chunks, stopped = stream(["xab"], ["ab", "b"])
    assert stopped and "".join(chunks) == "x"


def test_complete_match_waits_for_longer_earlier_candidate():
    # "a" completes inside "ba", but "baa" would start earlier: the next character decides.
    matcher = StopMatcher(["a", "baa"])
    assert matcher.push("ba") == ("", False)
    assert matcher.push("a") == ("", True)
    matcher = StopMatcher(["a", "baa"])
    assert matcher.push("ba") == ("", False)
    assert matcher.push("c") == ("b", True)
    # Generation ended while waiting: flush cuts at the complete match.
    matcher = StopMatcher(["a", "baa"])
    assert matcher.push("ba") == ("", False)
    assert matcher.flush() == "b" and matcher.stopped


def test_several_stop_strings_earliest_occurrence_wins():
    chunks, stopped = stream(["one END two", " STOP three"], ["STOP", "END"])
    assert stopped and "".join(chunks) == "one "
    # The later-listed, longer stop string occurs first.
    chunks, stopped = stream(["abc", "defg"], ["fg", "cde"])
    assert stopped and "".join(chunks) == "ab"


def test_partial_prefix_held_back_then_released_by_flush():
    matcher = StopMatcher(["</s>"])
    assert matcher.push("text</") == ("text", False)
    assert matcher.text == "text"
    assert matcher.push("b") == ("</b", False)  # no longer a prefix: released at once
    assert matcher.push("<") == ("", False)
    assert matcher.flush() == "<"
    assert matcher.text == "text</b<"


def test_hold_back_only_longest_proper_prefix():
    matcher = StopMatcher(["aab"])
    assert matcher.push("xaaa") == ("xa", False)  # "aa" could still become "aab"
    assert matcher.push("b") == ("", True)
    assert matcher.text == "xa"


def test_no_stop_strings_pass_through():
    matcher = StopMatcher([])
    assert matcher.push("any</s>") == ("any</s>", False)
    assert matcher.push("thing") == ("thing", False)
    assert matcher.flush() == ""
    assert matcher.text == "any</s>thing"


def test_push_after_stop_or_flush_is_a_bug():
    matcher = StopMatcher(["x"])
    matcher.push("x")
    assert matcher.stopped
    with pytest.raises(AssertionError):
        matcher.push("y")
    matcher = StopMatcher(["x"])
    matcher.flush()
    with pytest.raises(AssertionError):
        matcher.push("y")


@pytest.mark.parametrize("stop", [[""], ["ok", ""], "</s>"])
def test_invalid_stop_strings_raise(stop):
    with pytest.raises(ValueError, match="^stop"):
        StopMatcher(stop)


# A tiny alphabet makes matches, overlaps and partial prefixes common.
_text = st.text(alphabet="abc", max_size=24)
_stops = st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3)


@settings(max_examples=400, deadline=None)
@given(text=_text, stop=_stops, cuts=st.lists(st.integers(min_value=0, max_value=24), max_size=8))
def test_matches_reference_for_any_split(text, stop, cuts):
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    deltas = [text[i:j] for i, j in zip(bounds, bounds[1:])]

    chunks, stopped = stream(deltas, stop)
    expected = reference(text, stop)
    assert "".join(chunks) == expected
    assert stopped == any(s in text for s in stop)


@settings(max_examples=300, deadline=None)
@given(text=_text, stop=_stops, cuts=st.lists(st.integers(min_value=0, max_value=24), max_size=8))
def test_holds_back_exactly_the_longest_partial_match(text, stop, cuts):
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    matcher = StopMatcher(stop)
    for i, j in zip(bounds, bounds[1:]):
        _, stopped = matcher.push(text[i:j])
        if stopped:
            break
        so_far = text[:j]
        assert matcher.text + longest_held_suffix(so_far, stop) == so_far
