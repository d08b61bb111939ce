"""Tool calls out of the text a Mistral model writes after its [TOOL_CALLS] control token, and tool-call ids.

v3 models write `[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`. `ToolCallParser` reads that text as it
streams, in fragments cut anywhere (inside strings, inside escapes), with a small incremental JSON scanner that
looks at each character once. It yields OpenAI's streamed tool-call deltas: first a call's id and name, then its
arguments' raw text as it arrives, so the fragments concatenate to the final `arguments`. Without a grammar a model
may write anything: the parser never raises; text that is not a call comes back as leftover.

Mistral's tool-call ids are 9 ASCII alphanumerics (mistral-common refuses others), while OpenAI clients send ids of
any form (`call_abc...`): `model_tool_id` maps a client's id to a valid one, the same way in every process.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass, field

TOOL_ID_LENGTH = 9
_ALPHABET = string.digits + string.ascii_letters  # base 62
_TOOL_ID = re.compile(r"[0-9A-Za-z]{9}")
_WS = " \t\n\r"
_STRING_RUN = re.compile(r'[^"\\]+')  # string content up to the next quote or backslash
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALAR_END = frozenset(_WS + ",:]}[{\"")


def model_tool_id(client_id: str) -> str:
    """A client's tool-call id as a model id: ids already of 9 alphanumerics stay, any other string maps to 9
    alphanumerics from its sha256 (deterministic, so a call and its tool message map to the same id)."""
    if _TOOL_ID.fullmatch(client_id):
        return client_id
    n = int.from_bytes(hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).digest(), "big")
    digits = []
    for _ in range(TOOL_ID_LENGTH):
        n, d = divmod(n, len(_ALPHABET))
        digits.append(_ALPHABET[d])
    return "".join(digits)


def new_tool_id() -> str:
    """A fresh id for a call the model wrote (the model writes none in the v3 format)."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(TOOL_ID_LENGTH))


@dataclass
class ToolCallDelta:
    """One part of a streamed tool call (OpenAI's `delta.tool_calls[i]`): the first carries id and name."""
    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments, as the model wrote it


@dataclass
class _Call:
    """The call object being read."""
    start: int  # offset of its "{" in the parser's text
    key: str | None = None  # the key whose value is being read
    index: int | None = None  # set when its name is read: the call is then emitted
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)  # fragments (buffered until the name is known)
    has_arguments: bool = False


# Scanner states. Between values: _TOP (before an array or a lone call object; also after them), _ITEM (in the
# array, before a call or "]"), _AFTER_ITEM ("," or "]"), _KEY ('"' or "}"), _COLON, _VALUE (before a value),
# _AFTER_VALUE ("," or "}"). Inside a value: _STRING (a key, a name or string-encoded arguments, read whole), _SKIP
# (a value whose text is not needed), _ARGUMENTS (the arguments' raw text). _FAILED: no call from here on.
_TOP, _ITEM, _AFTER_ITEM, _KEY, _COLON, _VALUE, _AFTER_VALUE, _STRING, _SKIP, _ARGUMENTS, _FAILED = range(11)


class ToolCallParser:
    """Tool calls out of the text a model wrote after [TOOL_CALLS], fed in fragments."""

    def __init__(self) -> None:
        self._text: list[str] = []  # everything fed
        self._offset = 0  # where the fragment being read starts in the whole text
        self._state = _TOP
        self._in_array = False
        self._call: _Call | None = None
        self._calls: list[_Call] = []  # emitted (named) calls
        self._leftover: list[tuple[int, int | None]] = []  # [start, end) of text that is no call; None: to the end
        # value scanner: closers of open containers, in a string, after a backslash, in a scalar, the value ended
        self._closers: list[str] = []
        self._in_string = False
        self._escape = False
        self._scalar = False
        self._value_done = False
        # a string read whole: its role ("key", "name", "arguments"), raw text (quotes included), start offset
        self._role = ""
        self._string: list[str] = []
        self._string_start = 0

    def feed(self, text: str) -> list[ToolCallDelta]:
        """Read the next fragment; returns the deltas it completes (OpenAI's streamed tool_calls parts)."""
        self._text.append(text)
        deltas: list[ToolCallDelta] = []
        i, n = 0, len(text)
        while i < n and self._state != _FAILED:
            state = self._state
            if state == _ARGUMENTS:  # raw text: this fragment's part goes out as one delta
                j = self._scan_value(text, i)
                self._add_arguments(text[i:j], deltas)
                i = j
            elif state == _SKIP:
                i = self._scan_value(text, i)
            elif state == _STRING:
                i = self._scan_string(text, i, deltas)
            else:
                i = self._step(text[i], i, deltas)
            if self._value_done:
                self._value_done, self._state = False, _AFTER_VALUE
        self._offset += n
        return deltas

    def finish(self) -> tuple[list[ParsedToolCall], str]:
        """The calls read (a call cut short keeps the arguments read so far), and the text that was no call:
        all of it when no call was read, else what is not JSON of calls (garbage after them, objects without a name)."""
        text = "".join(self._text)
        calls = [ParsedToolCall(c.id, c.name, "".join(c.arguments)) for c in self._calls]
        if not calls:
            return calls, text.strip()
        # a call cut short before its name is dropped: it is no garbage, only unfinished
        return calls, "".join(text[start:end] for start, end in self._leftover).strip()

    # -- between values: one character at a time; returns the next index

    def _step(self, c: str, i: int, deltas: list[ToolCallDelta]) -> int:
        state = self._state
        if c in _WS:
            return i + 1
        if state == _TOP:
            if c == "[":
                self._in_array, self._state = True, _ITEM
            elif c == "{":
                self._in_array = False
                self._open_call(i)
            else:
                self._fail(self._offset + i)
        elif state in (_ITEM, _AFTER_ITEM):
            if c == "{" and state == _ITEM:
                self._open_call(i)
            elif c == "," and state == _AFTER_ITEM:
                self._state = _ITEM
            elif c == "]":
                self._state = _TOP
            else:
                self._fail(self._offset + i)
        elif state in (_KEY, _AFTER_VALUE):
            if c == '"' and state == _KEY:
                self._start_string("key", i)
                return i  # the string scanner reads the quote
            if c == "," and state == _AFTER_VALUE:
                self._state = _KEY
            elif c == "}":
                self._close_call(i, deltas)
            else:
                self._fail(self._offset + i)
        elif state == _COLON:
            if c == ":":
                self._state = _VALUE
            else:
                self._fail(self._offset + i)
        else:  # _VALUE
            return self._start_value(c, i)
        return i + 1

    def _start_value(self, c: str, i: int) -> int:
        call = self._call
        assert call is not None
        if c in ",:]}":
            self._fail(self._offset + i)
            return i + 1
        if call.key == "name" and call.index is None and c == '"':
            self._start_string("name", i)
        elif call.key == "arguments" and not call.has_arguments:
            call.has_arguments = True
            if c == '"':  # arguments encoded as a JSON string: its content is the arguments
                self._start_string("arguments", i)
            else:
                self._state = _ARGUMENTS
        else:  # "id", any other key, a repeated key, a name that is no string
            self._state = _SKIP
        return i  # the value's scanner reads its first character

    def _open_call(self, i: int) -> None:
        self._call = _Call(start=self._offset + i)
        self._state = _KEY

    def _close_call(self, i: int, deltas: list[ToolCallDelta]) -> None:
        call = self._call
        assert call is not None
        if call.index is None:  # no name: not a call
            self._leftover.append((call.start, self._offset + i + 1))
        elif not call.has_arguments:  # a call written without arguments takes none
            self._add_arguments("{}", deltas)
        self._call = None
        self._state = _AFTER_ITEM if self._in_array else _TOP

    def _fail(self, at: int) -> None:
        """No call from offset `at` on: that text is leftover, from the start of the call being read if unnamed."""
        call = self._call
        self._leftover.append((call.start if call is not None and call.index is None else at, None))
        self._state = _FAILED

    # -- inside a value

    def _start_string(self, role: str, i: int) -> None:
        self._state, self._role, self._string, self._string_start = _STRING, role, [], self._offset + i

    def _scan_string(self, text: str, i: int, deltas: list[ToolCallDelta]) -> int:
        """Read a string whole (its opening quote first); acts on it once it closes. Returns the next index."""
        start = i
        if not self._in_string:  # the opening quote
            self._in_string = True
            i += 1
        i = self._scan_in_string(text, i)
        self._string.append(text[start:i])
        if not self._in_string:
            self._string_done(deltas)
        return i

    def _scan_in_string(self, text: str, i: int) -> int:
        """Advance inside a string; stops after its closing quote (self._in_string False) or at the text's end."""
        n = len(text)
        while i < n:
            if self._escape:
                self._escape = False
                i += 1
            elif (m := _STRING_RUN.match(text, i)) is not None:
                i = m.end()
            elif text[i] == "\\":
                self._escape = True
                i += 1
            else:  # the closing quote
                self._in_string = False
                return i + 1
        return i

    def _string_done(self, deltas: list[ToolCallDelta]) -> None:
        call = self._call
        assert call is not None
        try:
            value = _sanitize(json.loads("".join(self._string), strict=False))
        except ValueError:  # an invalid escape
            self._fail(self._string_start)
            return
        self._string = []
        if self._role == "key":
            call.key, self._state = value, _COLON
            return
        if self._role == "name":
            call.name = value
            self._emit_call(call, deltas)
        else:
            self._add_arguments(value, deltas)
        self._value_done = True

    def _scan_value(self, text: str, i: int) -> int:
        """Advance through a JSON value: containers matched, strings skipped, a scalar up to its delimiter.
        Sets self._value_done when it ends; returns the index after it (or where it failed, or the text's end)."""
        n = len(text)
        while i < n:
            if self._in_string:
                i = self._scan_in_string(text, i)
                if not self._in_string and not self._closers:
                    self._value_done = True
                    return i
                continue
            c = text[i]
            if self._scalar:
                if c in _SCALAR_END:  # the delimiter belongs to the object
                    self._scalar, self._value_done = False, True
                    return i
            elif c == '"':
                self._in_string = True
            elif c in "[{":
                self._closers.append("]" if c == "[" else "}")
            elif c in "]}":
                if not self._closers or self._closers.pop() != c:
                    self._fail(self._offset + i)
                    return i
                if not self._closers:
                    self._value_done = True
                    return i + 1
            elif not self._closers:
                self._scalar = True
            i += 1
        return n

    def _add_arguments(self, fragment: str, deltas: list[ToolCallDelta]) -> None:
        call = self._call
        assert call is not None
        if not fragment:
            return
        call.arguments.append(fragment)
        if call.index is not None:
            deltas.append(ToolCallDelta(call.index, None, None, fragment))

    def _emit_call(self, call: _Call, deltas: list[ToolCallDelta]) -> None:
        call.index, call.id = len(self._calls), new_tool_id()
        self._calls.append(call)
        deltas.append(ToolCallDelta(call.index, call.id, call.name, ""))
        if buffered := "".join(call.arguments):  # arguments written before the name
            deltas.append(ToolCallDelta(call.index, None, None, buffered))


def _sanitize(value: str) -> str:
    """A decoded string without lone surrogates (a "\\ud800" escape), which no UTF-8 response can carry. Pairs
    were joined by json.loads, so every surrogate left is lone."""
    return _SURROGATE.sub("\ufffd", value)
