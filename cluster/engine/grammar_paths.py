"""A way to the end of a grammar: from a matcher's state, a run of tokens after which the output is complete (the
grammar stopped, or it accepts and EOS follows), found greedily within a bound on its length.

Guided decoding keeps one such run per sequence and never lets the tokens left fall below its length (guided.py),
so an output cut by max_tokens still ends where its grammar allows; the API asks for one from a grammar's start to
refuse schemas with no output within max_tokens (cluster/api/grammars.py).

Each step takes the tokens the grammar forces (llguidance's fast-forward tokens), else the first of a fixed
preference the grammar allows: closers of the open string, object or array, then the shortest JSON values, then a
separator or an opener. When none is allowed (a string's pattern or minLength, a number's bounds) it looks ahead:
a plain candidate (a character, or one of a few long words) or two after which the value can end or the grammar
forces bytes again (a pattern's fixed part). Failing that, a search that `fills` writes the longest allowed word
(a minLength), one that `explores` first writes each punctuation mark the value has not used yet (a pattern's
separators: the '@' and '.' of an address); `find` tries the first, then the second. The run is not the shortest
in general, but every token of it was accepted by the grammar, so following it always ends the output.

JSON is what this server's grammars write, so the preference reads where the output stands in its JSON text
(`JsonLex`: inside a string or not); for other grammars it is only a preference.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

# Preferred tokens, best first, by where the text stands. Byte strings the vocabulary lacks are skipped.
_IN_STRING = [b'"}]', b'"}}', b'"]}', b'"]]', b'"}', b'"]', b'"']
_OUTSIDE = [b'}]', b'}}', b']}', b']]', b'}', b']', b'""', b' ""', b'0', b'[]', b'{}', b'null', b'true', b'false',
            b',', b'"', b' "', b'{', b' {', b'[', b' [', b'-']
_ESCAPED = [b'n']  # after a backslash inside a string: the shortest escape to finish
_ENDERS_IN_STRING = [b'"']
_ENDERS_OUTSIDE = [b'}', b']', b',']
# Plain candidates when no preferred token is allowed: every printable ASCII character, the longest words (for a
# minLength, or a pattern's run of letters) and a word of two and of three letters (a pattern's short run).
_ALNUM = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PUNCTUATION = b"-._:@/+ #$%&*=?!~,;()[]{}<>|^'`"  # (no quote or backslash: they end or escape a string)
_LONG_WORDS = 4
_WORD = re.compile(rb"[A-Za-z]+")
_LOWER_WORD = re.compile(rb"[a-z]+")


@dataclass
class _Filler:
    """The word last written into a value that could not end yet, and how many times in a row: a minLength, which
    looking ahead again would not change."""

    token: int | None = None
    repeats: int = 0


class PathTimeout(Exception):
    """The search ran past its deadline."""


def is_panic(e: BaseException) -> bool:
    """Whether `e` is a panic inside llguidance (pyo3's PanicException): a BaseException that `except Exception`
    lets through, which a grammar's failure must not be."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


def is_failure(e: BaseException) -> bool:
    """Whether `e` is a failure to answer with an error (an Exception, or a panic inside llguidance), not an exit
    (KeyboardInterrupt, SystemExit) to let through."""
    return isinstance(e, Exception) or is_panic(e)


@dataclass
class JsonLex:
    """Where a JSON text stands lexically: inside a string (and right after a backslash there) or not, and the
    bytes the value being written has used so far."""

    in_string: bool = False
    escaped: bool = False
    used: set[int] = field(default_factory=set)

    def feed(self, data: bytes) -> None:
        for c in data:
            if self.escaped:
                self.escaped = False
            elif self.in_string and c == 0x5C:  # backslash
                self.escaped = True
            elif c == 0x22:  # quote
                self.in_string = not self.in_string
                self.used.clear()
            elif c in (0x2C, 0x3A, 0x5B, 0x7B) and not self.in_string:  # , : [ {: a new value
                self.used.clear()
            self.used.add(c)

    def copy(self) -> "JsonLex":
        return JsonLex(self.in_string, self.escaped, set(self.used))


class PathFinder:
    """Finds ways to the end of grammars over one vocabulary."""

    def __init__(self, token_bytes: list[bytes], special_ids: set[int], eos_id: int):
        self._bytes = token_bytes
        self._special = special_ids
        self.eos_id = eos_id
        ids: dict[bytes, int] = {}
        for i, b in enumerate(token_bytes):  # the last id of a byte string: the piece, not the byte fallback
            if i not in special_ids and b:
                ids[b] = i

        def known(strings: list[bytes]) -> list[int]:
            return [ids[b] for b in strings if b in ids]

        self._in_string, self._outside, self._escaped = known(_IN_STRING), known(_OUTSIDE), known(_ESCAPED)
        self._enders_in_string, self._enders_outside = known(_ENDERS_IN_STRING), known(_ENDERS_OUTSIDE)
        self._punctuation = known([bytes([c]) for c in _PUNCTUATION])
        self._punctuation_set = set(self._punctuation)
        longest = sorted(ids.items(), key=lambda item: -len(item[0]))
        words = [i for b, i in longest if _WORD.fullmatch(b)][:_LONG_WORDS]
        words += [i for b, i in longest if _LOWER_WORD.fullmatch(b)][:_LONG_WORDS]
        words += [next((i for b, i in longest if len(b) == n and _LOWER_WORD.fullmatch(b)), None) for n in (2, 3)]
        self._words = [i for i in dict.fromkeys(words) if i is not None]
        self._plain = known([bytes([c]) for c in _ALNUM]) + self._punctuation + self._words

    # -- the search ----------------------------------------------------------------------------------------------
    def find(self, matcher: Any, limit: int, lex: JsonLex | None = None, deadline: float | None = None,
             explore: bool = True) -> list[int] | None:
        """Tokens (at most `limit`) that take `matcher` from its state to a complete output, or None if neither
        search finds one that short or the grammar errs on the way (a limit: the matcher's error says which).
        `lex`: where the output stands in its JSON text (None: at its start). `deadline`: time.monotonic() past
        which it raises PathTimeout. `explore`: try the second search too (slower: it looks two candidates ahead at
        every step the preferences do not decide). Tokens are consumed on `matcher` and rolled back, so it is left
        where it was unless it errs: search a copy where that matters."""
        for exploring in (False, True)[:1 + explore]:
            path = self._greedy(matcher, limit, lex.copy() if lex is not None else JsonLex(), exploring, deadline)
            if path is not None or matcher.is_error():
                return path
        return None

    def completes(self, matcher: Any, path: list[int]) -> bool:
        """Whether `path` takes `matcher` from its state to a complete output; the matcher is left as it was."""
        taken = matcher.try_consume_tokens(path) if path else 0
        try:
            return taken == len(path) and matcher.is_stopped()
        finally:
            if taken:
                matcher.rollback(taken)

    def _greedy(self, matcher: Any, limit: int, lex: JsonLex, explore: bool,
                deadline: float | None) -> list[int] | None:
        path: list[int] = []
        filler = _Filler()
        try:
            while True:
                if matcher.is_error():
                    return None
                if matcher.is_stopped():
                    return path
                if matcher.is_accepting():
                    return path + [self.eos_id] if len(path) < limit else None
                if len(path) >= limit:
                    return None
                if deadline is not None and time.monotonic() > deadline:
                    raise PathTimeout
                forced = matcher.compute_ff_tokens()[:limit - len(path)]
                taken = matcher.try_consume_tokens(forced) if forced else 0
                if taken:
                    step = forced[:taken]
                else:
                    step = (self._choose(matcher, lex, explore, filler) or [])[:limit - len(path)]
                    if not step or matcher.try_consume_tokens(step) != len(step):
                        return None
                path.extend(step)
                for t in step:
                    if t not in self._special:
                        lex.feed(self._bytes[t])
        finally:
            if path and not matcher.is_error():
                matcher.rollback(len(path))

    def _choose(self, matcher: Any, lex: JsonLex, explore: bool, filler: _Filler) -> list[int] | None:
        """The next tokens of the way when the grammar forces none."""
        preferred = self._escaped if lex.escaped else self._in_string if lex.in_string else self._outside
        for t in preferred:
            if matcher.validate_tokens([t]):
                filler.token = None
                return [t]
        if filler.token is not None and filler.repeats >= (2 if explore else 1) and \
                matcher.validate_tokens([filler.token]):
            filler.repeats += 1
            return [filler.token]  # a minLength: the lookahead would fail again
        route = self._lookahead(matcher, self._enders_in_string if lex.in_string else self._enders_outside,
                                depth=2 if explore else 1)
        if route is not None:
            return route
        if explore:
            for t in self._punctuation:
                if self._bytes[t][0] not in lex.used and matcher.validate_tokens([t]):
                    return [t]
        longest = max((t for t in self._plain if matcher.validate_tokens([t])), key=lambda t: len(self._bytes[t]),
                      default=None)
        if longest is not None:
            filler.repeats = filler.repeats + 1 if longest == filler.token else 1
            filler.token = longest
            return [longest]
        return self._lowest_allowed(matcher)

    def _lookahead(self, matcher: Any, enders: list[int], depth: int) -> list[int] | None:
        """The fewest plain candidates (at most `depth`) after which the value can end or the grammar forces bytes,
        or None. Deeper, every punctuation mark is followed (a pattern's separators), and of the other candidates
        only the first leading to each set of allowed tokens."""
        deeper: list[int] = []
        seen: set[bytes] = set()
        for t in self._plain:
            if matcher.try_consume_tokens([t]):
                try:
                    if (matcher.is_accepting() or any(matcher.validate_tokens([e]) for e in enders)
                            or matcher.compute_ff_bytes()):
                        return [t]
                    if depth > 1 and t in self._punctuation_set:
                        deeper.append(t)
                    elif depth > 1:
                        mask = matcher.compute_bitmask()
                        if mask not in seen:
                            seen.add(mask)
                            deeper.append(t)
                finally:
                    matcher.rollback(1)
        for t in deeper:
            matcher.try_consume_tokens([t])
            try:
                rest = self._lookahead(matcher, enders, depth - 1)
            finally:
                matcher.rollback(1)
            if rest is not None:
                return [t] + rest
        return None

    def _lowest_allowed(self, matcher: Any) -> list[int] | None:
        mask = matcher.compute_bitmask()
        for word, bits in enumerate(memoryview(mask).cast("I")):
            while bits:
                t = word * 32 + (bits & -bits).bit_length() - 1
                if t != self.eos_id:
                    return [t]
                bits &= bits - 1
        return None
