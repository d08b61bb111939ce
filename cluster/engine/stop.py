"""Stop strings over streamed text: never emit a stop string, hold back what could be the start of one."""

from __future__ import annotations


class StopStringFilter:
    """Filters the text deltas of one sequence (as the detokenizer emits them) against its stop strings.

    Usage, per sequence::

        f = StopStringFilter(params.stop)
        for each new token: text = f.push(detok.add([token])); emit text; if f.stopped: finish the sequence
        at the end (max_tokens, EOS, ...): text = f.push(detok.flush()) + f.flush(); emit text

    `push` returns the text that may be emitted now. A tail that could be the start of a stop string is held back
    until later text completes it (stop) or diverges from it (released). When a stop string completes, `stopped`
    becomes True, `matched` names it, and `push` returns the text before it; the stop string and everything after
    it are never emitted, and later calls return "". The stop that completes first wins (on a tie, the one that
    starts first), so the result does not depend on how the text is split into deltas.
    """

    def __init__(self, stop: tuple[str, ...] | list[str]):
        if not all(stop):
            raise ValueError("stop strings must not be empty")
        self.stop = tuple(stop)
        self.stopped = False
        self.matched: str | None = None
        self._held = ""  # never contains a whole stop string but in its first `_quiet` characters
        self._quiet = 0  # leading characters of `_held` pushed with can_stop false: no stop may end within them
        self._longest = max((len(s) for s in self.stop), default=0)

    def push(self, delta: str, can_stop: bool = True) -> str:
        """Add a text delta; return what may be emitted now (possibly ""). With `can_stop` false (the output is
        still shorter than its min_tokens) a stop string completed in this text is content like any other; only a
        stop that ends in a later delta can stop it, as vLLM checks stops only in text past min_tokens."""
        if self.stopped:
            return ""
        text = self._held + delta
        hit = self._first_stop(text, self._quiet) if can_stop else None
        if hit is not None:
            start, stop = hit
            self.stopped, self.matched, self._held = True, stop, ""
            return text[:start]
        cut = len(text) - self._partial_tail(text)
        self._held = text[cut:]
        self._quiet = len(self._held) if not can_stop else max(0, self._quiet - cut)
        return text[:cut]

    @property
    def held(self) -> str:
        """The text held back now (a possible start of a stop string)."""
        return self._held

    def flush(self) -> str:
        """At the end of a sequence that finished for another reason: release the held-back tail."""
        text, self._held = ("" if self.stopped else self._held), ""
        return text

    def _first_stop(self, text: str, quiet: int = 0) -> tuple[int, str] | None:
        """(start, stop string) of the stop that ends first in `text` after its first `quiet` characters, ties going
        to the earlier start."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = text.find(s, max(0, quiet - len(s) + 1))
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
