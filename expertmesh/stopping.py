"""Stop strings for streamed completions: emit text as soon as it is safe, never the stop string.

Text arrives as deltas (from incremental detokenisation), and a stop string may be split across
several of them, so some text has to be held back until we know whether it starts a stop string.
`StopMatcher` holds back as little as possible: only the longest suffix of the text so far that
is a proper prefix of some stop string. Everything before that suffix can never be part of a
match, so it is emitted at once.

The completion is cut before the *earliest-starting* occurrence of any stop string, whatever the
split into deltas. So a complete match is only final once no earlier-starting, longer stop string
can still complete: with stops ("a", "baa"), "ba" completes "a" but "baa" may follow, so "ba" is
held until the next character decides. Such a wait lasts at most len(longest stop) - 1 characters.

Why a bounded window suffices: after each push no stop string can start in the emitted text (a
start there would either be a full match found earlier or make that text part of the held-back
prefix). So every future match starts inside the held-back text or the new delta, and a search
of `held + delta` (at most len(longest stop) - 1 + len(delta) characters) finds the earliest one.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text deltas of a completion; emits text that can no longer be part of a stop string,
    holds back a possible partial match, and reports a full match.

    The concatenation of everything emitted (by `push` and `flush`) equals the completion text cut
    right before the earliest occurrence of any stop string, or the whole text if none occurs.
    """

    def __init__(self, stop: Sequence[str]):
        # A bare string would be taken as one stop string per character.
        if isinstance(stop, str):
            raise ValueError(f"stop must be a sequence of strings, not a single string: {stop!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._stop = tuple(dict.fromkeys(stop))  # de-duplicated, order kept
        # Every proper prefix of every stop string: the suffixes we may have to hold back.
        self._prefixes = frozenset(s[:i] for s in self._stop for i in range(1, len(s)))
        self._max_held = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""
        self._emitted: list[str] = []
        self._stopped = False
        self._flushed = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def stopped(self) -> bool:
        """True once a stop string has been seen; the completion is over."""
        return self._stopped

    def push(self, delta: str) -> tuple[str, bool]:
        """Add the next piece of completion text; returns (text safe to emit now, stopped).

        When stopped, the returned text ends right before the earliest stop-string occurrence,
        which is never emitted, and generation should end. Pushing after a stop or after `flush`
        is a caller bug.
        """
        assert not self._stopped, "push after a stop string was matched"
        assert not self._flushed, "push after flush"
        if not self._stop:
            self._emitted.append(delta)
            return delta, False
        window = self._held + delta
        match = self._earliest_match(window)
        held_from = len(window) - self._held_suffix_len(window)
        # A match is final unless a stop string that would start earlier may still complete.
        if match is not None and match <= held_from:
            self._stopped = True
            self._held = ""
            out = window[:match]
        else:
            self._held = window[held_from:]
            out = window[:held_from]
        self._emitted.append(out)
        return out, self._stopped

    def flush(self) -> str:
        """End of generation: release the held-back text. Nothing may be pushed afterwards.

        The held text can contain a complete match that was waiting on a longer, earlier-starting
        candidate; it is cut there and `stopped` becomes True.
        """
        self._flushed = True
        match = self._earliest_match(self._held)
        if match is not None:
            self._stopped = True
        out = self._held[:match]
        self._held = ""
        self._emitted.append(out)
        return out

    def _earliest_match(self, window: str) -> int | None:
        """Start of the earliest stop-string occurrence in `window`, or None."""
        starts = [i for i in (window.find(s) for s in self._stop) if i >= 0]
        return min(starts) if starts else None

    def _held_suffix_len(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of a stop string."""
        for n in range(min(self._max_held, len(window)), 0, -1):
            if window[len(window) - n :] in self._prefixes:
                return n
        return 0
