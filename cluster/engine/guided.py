"""Grammar-constrained decoding: each guided sequence's output must match its request's grammar (llguidance).

A grammar compiles once (`compile`, cached by its sha256, on any thread: the async front calls it off the engine
thread) and each sequence copies the compiled matcher. Every step the engine asks for the masks of the guided rows it
samples (`masks`): llguidance computes them for the whole batch on its own threads, with the GIL released, into one
packed bitmask [M, W] (bit t % 32 of word t // 32 allows token t). On a GPU the forward pass is still running then
(the step reads its results only when it samples), so the masks cost no step time. After sampling, `advance` feeds
each row's token to its matcher; once the grammar is complete the sequence is done.

Running out of tokens. A grammar says what may come next, not how much is left, so a JSON value cut by max_tokens
would not parse. Each guided sequence keeps a way to the end of its grammar from where it stands
(`grammar_paths.PathFinder`: tokens the grammar allows after which the output is complete: the closers, and every
required member, item and character still to come), never longer than the tokens it has left. When the tokens left
fall to its length, the mask allows only its next token. A token sampled freely is checked before it is taken
(`keep_in_budget`): the way still ends the output from the state after it (the common case: a string goes on), or a
new way from there fits the tokens left after it; if neither, the token would leave the output no way to end, and
the way's next token replaces it. So a guided output always ends where its grammar allows, unless its grammar's way
from the start is already longer than max_tokens (the API refuses those requests).

Faults. Whatever llguidance does with one sequence's grammar (a matcher in an error state, a mask that allows
nothing, an exception, a panic) is that sequence's fault alone: `masks` and `keep_in_budget` report it as a
`GrammarFault` for that row, `advance` raises one, and the engine fails that request and steps on with the rest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.engine.grammar_paths import JsonLex, PathFinder, PathTimeout, is_failure, is_panic
from cluster.engine.outputs import RequestError
from cluster.engine.sequence import Sequence

log = logging.getLogger(__name__)
# The longest a way-to-the-end search may hold the engine's step (the API's check before admission has its own).
STEP_SEARCH_S = 0.02

MAX_COMPILED = 256  # compiled grammars kept (least recently used dropped)
COMPILE_SEARCH_SECONDS = 5.0  # the search for a grammar's way from its start, when it compiles (off the engine thread)
MAX_FAULT_CHARS = 200


class GrammarError(RequestError):
    """A grammar the engine cannot compile: the request is refused (400) before it is scheduled."""


class GrammarFault(Exception):
    """A guided sequence's grammar failed while it ran: its request ends with this error. `status`: 400 when the
    grammar is at fault (llguidance's limits, a grammar that allows nothing), 500 for a fault of the server's."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def grammar_engine_installed() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def as_fault(e: BaseException) -> GrammarFault:
    """What an exception raised by one sequence's grammar work means for its request."""
    if isinstance(e, GrammarFault):
        return e
    if is_panic(e):
        return GrammarFault("the output format could not be followed: the grammar engine failed", 500)
    return GrammarFault(f"the output format could not be followed: {type(e).__name__}", 500)


@dataclass
class _Compiled:
    matcher: Any  # llguidance.LLMatcher at the grammar's start; never advanced (sequences copy it)
    path: list[int] | None  # a way to the end from the start; None: none found


@dataclass
class _Guided:
    matcher: Any
    path: list[int] | None  # a way to the end from here that the tokens left hold; None: none (the output may be cut)
    lex: JsonLex = field(default_factory=JsonLex)
    next: tuple[int, list[int] | None] | None = None  # (token, the way after it) as keep_in_budget checked it


class GrammarGuide:
    """Compiled grammars and the matcher state of every guided sequence; masks computed a batch at a time."""

    def __init__(self, tokenizer: Any, token_bytes: list[bytes], special_ids: set[int],
                 max_compiled: int = MAX_COMPILED):
        """`tokenizer` is the `llguidance.LLTokenizer` of the model's vocabulary, `token_bytes` every token's
        bytes, `special_ids` the control tokens (no text)."""
        import llguidance

        self._llg = llguidance
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.vocab_size
        self.words = (self.vocab_size + 31) // 32
        self.eos_id: int = tokenizer.eos_token
        self._bytes = token_bytes
        self._special = special_ids
        self._paths = PathFinder(token_bytes, special_ids, self.eos_id)
        self._compiled: OrderedDict[bytes, _Compiled] = OrderedDict()
        self._lock = threading.Lock()
        self._max_compiled = max_compiled
        self._executor = llguidance.LLExecutor()
        self._seqs: dict[int, _Guided] = {}

    @classmethod
    def for_tokenizer(cls, version: str) -> "GrammarGuide":
        """The guide for a mistral-common tokenizer version."""
        from cluster.tokenizer.grammar import grammar_tokenizer, special_token_ids, token_bytes

        return cls(grammar_tokenizer(version), token_bytes(version), special_token_ids(version))

    @classmethod
    def if_installed(cls, version: str) -> "GrammarGuide | None":
        """`for_tokenizer(version)`, or None where llguidance is not installed (a machine that carries only what
        serving plain text needs): the engine then refuses guided requests, and the API answers them 400."""
        if not grammar_engine_installed():
            log.warning("llguidance is not installed: requests for structured output will be refused")
            return None
        return cls.for_tokenizer(version)

    # -- grammars ----------------------------------------------------------------------------------------------
    def compile(self, grammar: str, max_path: int) -> _Compiled:
        """The compiled `grammar` (cached) with its way to the end from the start, searched within `max_path`
        tokens (the engine's context); raises GrammarError. Safe from any thread."""
        key = hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        try:
            matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)  # releases the GIL while it compiles
            if matcher.is_error():
                raise GrammarError(f"the output format cannot be enforced: {_condense(matcher.get_error())}")
            search = matcher.deep_copy()  # a limit met on the way leaves the copy in error, not the matcher
            try:
                path = self._paths.find(search, max_path, deadline=time.monotonic() + COMPILE_SEARCH_SECONDS)
            except PathTimeout:
                path = None
            if search.is_error():
                raise GrammarError(f"the output format cannot be enforced: {_condense(search.get_error())}")
        except BaseException as e:
            if not is_panic(e):
                raise
            log.warning("the grammar engine panicked compiling a grammar (%s)", type(e).__name__)
            raise GrammarError("the output format cannot be enforced: the grammar engine failed on it") from None
        compiled = _Compiled(matcher, path)
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self._max_compiled:
                self._compiled.popitem(last=False)
        return compiled

    # -- sequences ---------------------------------------------------------------------------------------------
    def start(self, seq: Sequence, compiled: _Compiled) -> None:
        """Track `seq` from its first output token, with its own copy of its grammar's `compiled` matcher; raises
        GrammarError (and tracks nothing) if llguidance cannot copy it."""
        try:
            matcher = compiled.matcher.deep_copy()
        except BaseException as e:
            if not is_failure(e):
                raise
            raise GrammarError("the output format cannot be enforced: the grammar engine failed on it") from None
        path = compiled.path
        self._seqs[seq.seq_id] = _Guided(matcher, list(path) if path is not None else None)

    def release(self, seq: Sequence) -> None:
        self._seqs.pop(seq.seq_id, None)

    @property
    def active(self) -> int:
        """Sequences tracked now."""
        return len(self._seqs)

    def masks(self, seqs: list[Sequence], context_len: int
              ) -> tuple[list[int], torch.Tensor, dict[int, GrammarFault]] | None:
        """(rows, bitmask [M, W] int32, faults by seq_id) for the guided ones among the sequences about to sample,
        or None. A faulted row allows only EOS (so it samples something); the engine fails its request."""
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self._seqs]
        if not rows:
            return None
        bitmask = torch.zeros(len(rows), self.words, dtype=torch.int32)
        guided = [self._seqs[seqs[i].seq_id] for i in rows]
        faults = self._fill_masks(guided, [seqs[i] for i in rows], bitmask)
        empty = (~bitmask.any(dim=1)).tolist()
        for j, i in enumerate(rows):
            seq, g = seqs[i], guided[j]
            if seq.seq_id not in faults:
                try:
                    fault = self._check_row(g, empty[j])
                    if fault is None:
                        self._steer(g, bitmask[j], _tokens_left(seq, context_len))
                        continue
                except BaseException as e:
                    if not is_failure(e):
                        raise
                    fault = as_fault(e)
                faults[seq.seq_id] = fault
            bitmask[j].zero_()
            bitmask[j, self.eos_id >> 5] = _bit(self.eos_id & 31)
        return rows, bitmask, faults

    def only(self, token: int) -> torch.Tensor:
        """The packed mask [W] allowing only `token`."""
        words = torch.zeros(self.words, dtype=torch.int32)
        words[token >> 5] = _bit(token & 31)
        return words

    def keep_in_budget(self, seq: Sequence, token: int, context_len: int) -> int:
        """The token `seq` takes for its sampled `token`: that one, unless it leaves the output no way to end in
        the tokens left after it; then its way's next token. Leaves the matcher as it was (`advance` takes it)."""
        g = self._seqs.get(seq.seq_id)
        if g is None or g.path is None or not g.path:
            return token
        if token == g.path[0]:
            g.next = (token, g.path[1:])
            return token
        matcher, left = g.matcher, _tokens_left(seq, context_len) - 1
        if not matcher.try_consume_tokens([token]):
            return token  # the mask forbade it: `advance` reports the fault
        try:
            if len(g.path) <= left and self._paths.completes(matcher, g.path):
                after: list[int] | None = g.path  # the way still ends it (a string went on)
            else:
                lex = g.lex.copy()
                lex.feed(self._token_text(token))
                after = self._paths.find(matcher.deep_copy(), left, lex, explore=False,
                                         deadline=time.monotonic() + STEP_SEARCH_S)
        except PathTimeout:
            after = None  # no new way found in time: keep the old one, which still ends the output
        finally:
            matcher.rollback(1)
        if after is None:
            token = g.path[0]
            after = g.path[1:]
        g.next = (token, after)
        return token

    def advance(self, seq: Sequence, token: int) -> bool:
        """Feed the sampled token; True when the output is complete (the grammar accepts and allows no more).
        Raises GrammarFault if the grammar does not take it."""
        g = self._seqs.get(seq.seq_id)
        if g is None:
            return False
        if not g.matcher.consume_token(token):
            error = g.matcher.get_error()
            if "doesn't satisfy the grammar" in error:  # the mask forbade it: only a fault of ours gets here
                log.error("guided sequence %d sampled token %d, which its grammar forbids: %r", seq.seq_id, token,
                          _condense(error))
                raise GrammarFault("the output format could not be followed: a token it forbids was sampled", 500)
            raise GrammarFault(f"the output format could not be followed: {_condense(error)}", 400)
        if g.path is not None:
            if g.next is not None and g.next[0] == token:
                g.path = g.next[1]
            else:  # not checked by keep_in_budget (the engine always checks; kept safe for other callers)
                g.path = g.path[1:] if g.path and g.path[0] == token else None
        g.next = None
        g.lex.feed(self._token_text(token))
        return g.matcher.is_stopped()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _fill_masks(self, guided: list[_Guided], seqs: list[Sequence], bitmask: torch.Tensor
                    ) -> dict[int, GrammarFault]:
        """Every row's mask, in one batched call; if that fails, row by row, so a failure is one row's fault."""
        stride = self.words * 4
        try:
            self._executor.unsafe_compute_mask_ptr([(g.matcher, j) for j, g in enumerate(guided)],
                                                   bitmask.data_ptr(), stride, len(guided))
            return {}
        except BaseException as e:
            if not is_failure(e):
                raise
            log.warning("batched grammar masks failed (%s); computing them row by row", type(e).__name__)
        faults = {}
        for j, (g, seq) in enumerate(zip(guided, seqs)):
            try:
                g.matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + j * stride, stride)
            except BaseException as e:
                if not is_failure(e):
                    raise
                bitmask[j].zero_()
                faults[seq.seq_id] = as_fault(e)
        return faults

    def _check_row(self, g: _Guided, empty: bool) -> GrammarFault | None:
        if g.matcher.is_error():
            return GrammarFault(f"the output format could not be followed: {_condense(g.matcher.get_error())}", 400)
        if empty:
            return GrammarFault("the output format could not be followed: its grammar allows no token here", 400)
        return None

    def _steer(self, g: _Guided, words: torch.Tensor, left: int) -> None:
        """With exactly as many tokens left as its way takes, a sequence may only follow its way."""
        if g.path is not None and len(g.path) > left:
            # Only at a sequence's start: the way found when its grammar compiled is longer than this request's
            # budget; the API found one that fits (or the request came past it), so look for it once.
            try:
                g.path = self._paths.find(g.matcher.deep_copy(), left, g.lex,
                                          deadline=time.monotonic() + STEP_SEARCH_S)
            except PathTimeout:  # not in time: this sequence goes unsteered rather than stall the step
                g.path = None
        if g.path is None or len(g.path) < left:
            return
        t = g.path[0] if g.path else None
        if t is None or not int(words[t >> 5]) >> (t & 31) & 1:
            g.path = None  # cannot happen (the way was checked): fail safe, without steering
            return
        words.zero_()
        words[t >> 5] = _bit(t & 31)

    def _token_text(self, token: int) -> bytes:
        return b"" if token in self._special else self._bytes[token]


def _tokens_left(seq: Sequence, context_len: int) -> int:
    """Tokens `seq` may still generate, counting the one it samples now."""
    return min(seq.params.max_tokens - len(seq.output), context_len - seq.num_tokens)


def _bit(i: int) -> int:
    """Bit i of an int32 word, as the signed value torch stores."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


_INTERNALS = re.compile(r"^(parser|lexer) error: ", re.I)


def _condense(text: str) -> str:
    """llguidance's message as one short line (its first; the state dump after it is for its developers)."""
    line = _INTERNALS.sub("", text.strip().splitlines()[0] if text.strip() else "") or "its grammar failed"
    return line if len(line) <= MAX_FAULT_CHARS else line[:MAX_FAULT_CHARS - 3] + "..."
