"""Grammar-constrained decoding: each guided sequence's output must match its request's grammar (llguidance).

A grammar compiles once (`compile`, cached by its sha256, on any thread: the async front calls it off the engine
thread) and each sequence copies the compiled matcher. Every step the engine asks for the masks of the guided rows it
samples (`masks`): llguidance computes them for the whole batch on its own threads, with the GIL released, into one
packed bitmask [M, W] (bit t % 32 of word t // 32 allows token t). On a GPU the forward pass is still running then
(the step reads its results only when it samples), so the masks cost no step time. After sampling, `advance` feeds
each row's token to its matcher; once the grammar is complete the sequence is done.

Running out of tokens. A grammar says what may come next, not how much is left, so a long JSON value cut by
max_tokens would not parse. When a sequence's remaining budget falls to what closing its JSON could take (every
open level, and room for one more value as long as the longest so far: `_JsonDepth.closing_cost`), the guide steers
it: among the tokens the grammar allows it forces the one that closes the innermost open string, object or array
(`"`, `}`, `]`), else one that writes or starts the shortest key or value (`""`, `"`, `0`), and otherwise leaves the
grammar's mask as it is (a forced key, a boolean). So a JSON output parses unless its schema's required parts alone
are longer than the budget.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.engine.outputs import RequestError
from cluster.engine.sequence import Sequence

log = logging.getLogger(__name__)

MAX_COMPILED = 256  # compiled grammars kept (least recently used dropped)
# Tokens closing one level of JSON may take under steering, at worst right after a comma in an object: a key
# ('"' '"'), its separator (':' ' '), the shortest value ('"' '"') and '}'.
_CLOSE_COST_PER_LEVEL = 7
_SLACK = 3
# What steering prefers, best first (the grammar decides which are allowed; separators may want a leading space).
_CLOSE_STRING = [b'"}]', b'"}', b'"]', b'"']
_CLOSE_VALUE = [b"}", b"]", b" }", b" ]", b' ""}', b'""}', b' ""', b'""', b' "', b'"', b" 0", b"0"]


class GrammarError(RequestError):
    """A grammar the engine cannot compile: the request is refused (400) before it is scheduled."""


@dataclass
class _JsonDepth:
    """Where the output stands in its JSON, for steering: open containers, whether it is inside a string, and the
    most tokens a whole value took at each depth (another one there may take as many)."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    tokens: int = 0
    opened_at: list[int] = field(default_factory=list)  # the token each open container started at
    longest: dict[int, int] = field(default_factory=dict)  # depth -> most tokens a container opened there took

    def feed(self, data: bytes) -> None:
        """One token's bytes."""
        self.tokens += 1
        for c in data:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == 0x5C:  # backslash
                    self.escaped = True
                elif c == 0x22:
                    self.in_string = False
            elif c == 0x22:
                self.in_string = True
            elif c in (0x7B, 0x5B):  # { [
                self.depth += 1
                self.opened_at.append(self.tokens)
            elif c in (0x7D, 0x5D) and self.opened_at:  # } ]
                took = self.tokens - self.opened_at.pop() + 1
                self.longest[self.depth] = max(self.longest.get(self.depth, 0), took)
                self.depth -= 1

    def closing_cost(self) -> int:
        """Tokens to keep in hand: closing every open level, plus room for one more value as long as any value that
        may get a sibling has taken (finished a level down, or still open below the root). A token can close a value
        and start the next one at once, so the room is kept from the first value on: an array of tool calls must
        not begin a call it cannot finish."""
        sibling = max([self.longest.get(self.depth + 1, 0)] + [self.tokens - t + 1 for t in self.opened_at[1:]])
        return _CLOSE_COST_PER_LEVEL * self.depth + self.in_string + _SLACK + sibling


@dataclass
class _Guided:
    matcher: Any  # llguidance.LLMatcher
    json: _JsonDepth = field(default_factory=_JsonDepth)


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
        self._compiled: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._max_compiled = max_compiled
        self._executor = llguidance.LLExecutor()
        self._seqs: dict[int, _Guided] = {}
        ids = {b: i for i, b in reversed(list(enumerate(token_bytes))) if i not in special_ids}
        self._close_string = [ids[b] for b in _CLOSE_STRING if b in ids]
        self._close_value = [ids[b] for b in _CLOSE_VALUE if b in ids]

    @classmethod
    def for_tokenizer(cls, version: str) -> "GrammarGuide":
        """The guide for a mistral-common tokenizer version."""
        from cluster.tokenizer.grammar import grammar_tokenizer, special_token_ids, token_bytes

        return cls(grammar_tokenizer(version), token_bytes(version), special_token_ids(version))

    # -- grammars ----------------------------------------------------------------------------------------------
    def compile(self, grammar: str) -> Any:
        """The compiled matcher of `grammar` (cached); raises GrammarError. Safe from any thread."""
        key = hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)  # releases the GIL while it compiles
        if matcher.is_error():
            raise GrammarError("the output format cannot be enforced: "
                               f"{_first_line(matcher.get_error()) or 'invalid grammar'}")
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > self._max_compiled:
                self._compiled.popitem(last=False)
        return matcher

    # -- sequences ---------------------------------------------------------------------------------------------
    def start(self, seq: Sequence, compiled: Any) -> None:
        """Track `seq` from its first output token, with its own copy of its grammar's `compiled` matcher."""
        self._seqs[seq.seq_id] = _Guided(compiled.deep_copy())

    def release(self, seq: Sequence) -> None:
        self._seqs.pop(seq.seq_id, None)

    @property
    def active(self) -> int:
        """Sequences tracked now."""
        return len(self._seqs)

    def masks(self, seqs: list[Sequence], context_len: int) -> tuple[list[int], torch.Tensor] | None:
        """(rows, bitmask [M, W] int32) for the guided ones among the sequences about to sample, or None."""
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self._seqs]
        if not rows:
            return None
        bitmask = torch.zeros(len(rows), self.words, dtype=torch.int32)
        matchers = [(self._seqs[seqs[i].seq_id].matcher, j) for j, i in enumerate(rows)]
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), self.words * 4, len(rows))
        # A matcher in an error state allows nothing: that sequence alone ends (EOS), not the whole step.
        for j in (bitmask == 0).all(dim=1).nonzero().flatten().tolist():
            log.error("guided sequence %d can go no further: %s", seqs[rows[j]].seq_id,
                      _first_line(matchers[j][0].get_error()) or "its grammar allows no token")
            bitmask[j, self.eos_id >> 5] = _bit(self.eos_id & 31)
        for j, i in enumerate(rows):
            seq = seqs[i]
            left = min(seq.params.max_tokens - len(seq.output), context_len - seq.num_tokens)
            state = self._seqs[seq.seq_id].json
            if left <= state.closing_cost():
                self._steer(bitmask[j], self._close_string if state.in_string and not state.escaped
                            else self._close_value)
        return rows, bitmask

    def advance(self, seq: Sequence, token: int) -> bool:
        """Feed the sampled token; True when the output is complete (the grammar accepts and allows no more)."""
        guided = self._seqs.get(seq.seq_id)
        if guided is None:
            return False
        if not guided.matcher.consume_token(token):  # the mask forbade it: only a fault gets here
            log.error("guided sequence %d sampled token %d, which its grammar forbids: %s", seq.seq_id, token,
                      _first_line(guided.matcher.get_error()))
            raise RuntimeError("a guided sequence sampled a token its grammar forbids")
        if token not in self._special:
            guided.json.feed(self._bytes[token])
        return guided.matcher.is_stopped()

    def _steer(self, words: torch.Tensor, preferred: list[int]) -> None:
        """Keep only the first of `preferred` that `words` allows; leave `words` as it is if it allows none."""
        for t in preferred:
            if int(words[t >> 5]) >> (t & 31) & 1:
                words.zero_()
                words[t >> 5] = _bit(t & 31)
                return


def _bit(i: int) -> int:
    """Bit i of an int32 word, as the signed value torch stores."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""
