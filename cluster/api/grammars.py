"""Grammars for structured output: a JSON schema (response_format) and forced tool calls (tool_choice), as
llguidance grammar strings that `SamplingParams.grammar` carries to the engine.

JSON is written without flexible whitespace, with ", " and ": " as separators, so an output's length is bounded by
its content and a tool call reads exactly like mistral-common's v3 format:
`[TOOL_CALLS] [{"name": "f", "arguments": {...}}]`. A client's schema is bounded (JSON text size, nesting depth)
before llguidance sees it, and `check_grammar` turns llguidance's verdict into one short line a client can read.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from typing import Any

MAX_SCHEMA_CHARS = 64 * 1024  # one schema's JSON text (a response_format schema, or one tool's parameters)
MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in one schema's JSON text
MAX_TOOLS = 128  # OpenAI's own limit on tools per request
MAX_TOOL_SCHEMA_CHARS = 512 * 1024  # all tools of one request together
MAX_ERROR_CHARS = 200
CACHE_SIZE = 1024  # grammar verdicts kept, by sha256 of the grammar

# Output format of every grammar here: compact JSON with the separators mistral-common writes.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class GrammarError(ValueError):
    """A schema or grammar the server cannot enforce; the message is for the client (no library internals)."""


def json_grammar(schema: dict | None) -> str:
    """The grammar of JSON text that matches `schema`; None: any JSON object (response_format json_object)."""
    import llguidance

    schema = _ANY_OBJECT if schema is None else _client_schema(schema, "the JSON schema")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:  # the schema is not JSON (it cannot be after _client_schema; kept as a guard)
        raise GrammarError(f"the JSON schema is not valid JSON: {_condense(str(e))}") from e


def tool_call_grammar(tools: list[dict], name: str | None, parallel: bool) -> str:
    """The grammar of a v3 tool-call turn: `<TOOL_CALLS>`, a space, then a JSON array of calls, each
    `{"name": <a tool's name>, "arguments": <its parameters>}` (only `name`'s when given; one call unless parallel).
    tools: OpenAI tool dicts ({"type": "function", "function": {"name", "description"?, "parameters"?}})."""
    import llguidance

    calls = {"type": "array", "items": {"anyOf": _call_schemas(tools, name)}, "minItems": 1,
             "x-guidance": JSON_OPTIONS}
    if not parallel:
        calls["maxItems"] = 1
    text = json.dumps(calls, ensure_ascii=True)  # one line: strings inside are escaped, so lark reads it whole
    if len(text) > MAX_TOOL_SCHEMA_CHARS:
        raise GrammarError(f"the tools' schemas are too large ({len(text)} characters of JSON; "
                           f"at most {MAX_TOOL_SCHEMA_CHARS})")
    return llguidance.LLMatcher.grammar_from_lark(f'start: <TOOL_CALLS> " " calls\ncalls: %json {text}\n')


def check_grammar(grammar: str, tokenizer_version: str) -> None:
    """Raise GrammarError if llguidance cannot enforce `grammar` with that tokenizer (an invalid or unsupported
    schema). Verdicts are cached by the grammar's digest, so a schema a client repeats is compiled once."""
    key = (hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).hexdigest(), tokenizer_version)
    error = _VERDICTS.get(key)
    if error is None:
        error = _validate(grammar, tokenizer_version)
        _VERDICTS.put(key, error)
    if error:
        raise GrammarError(error)


def _validate(grammar: str, tokenizer_version: str) -> str:
    """'' if valid, else the client's message."""
    import llguidance

    from cluster.tokenizer.grammar import grammar_tokenizer

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, grammar_tokenizer(tokenizer_version))
    return f"invalid JSON schema: {_condense(messages[0] if messages else '')}" if is_error else ""


def _call_schemas(tools: list[dict], name: str | None) -> list[dict]:
    """One object schema per callable tool: its name as a constant, its parameters as the arguments."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools must be a non-empty list")
    if len(tools) > MAX_TOOLS:
        raise GrammarError(f"too many tools ({len(tools)}; at most {MAX_TOOLS})")
    schemas = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        tool_name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(tool_name, str) or not tool_name:
            raise GrammarError(f"tools[{i}] has no function name")
        if name is not None and tool_name != name:
            continue
        parameters = function.get("parameters")
        parameters = _ANY_OBJECT if not parameters else _client_schema(parameters, f"tools[{i}].function.parameters")
        schemas.append({"type": "object", "properties": {"name": {"const": tool_name}, "arguments": parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not schemas:
        raise GrammarError(f"no tool named {name!r} in tools")
    return schemas


def _client_schema(schema: Any, what: str) -> dict:
    """A client's schema, bounded and without its own compiler options (x-guidance would override ours)."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON object")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"{what} is not JSON") from e
    if len(text) > MAX_SCHEMA_CHARS:
        raise GrammarError(f"{what} is too large ({len(text)} characters of JSON; at most {MAX_SCHEMA_CHARS})")
    if _depth_exceeds(schema, MAX_SCHEMA_DEPTH):
        raise GrammarError(f"{what} is nested too deeply (at most {MAX_SCHEMA_DEPTH} levels)")
    return {k: v for k, v in schema.items() if k != "x-guidance"}


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether objects/arrays nest deeper than `limit` (iterative: a deep value must not exhaust the stack)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


# llguidance's messages, reworded where they name its internals. Applied in order to the condensed message.
_REWORDS = [
    (re.compile(r"^at \d+\(\d+\): "), ""),  # lark position of the %json rule: ours, not the client's
    (re.compile(r"^failed to compile JSON schema: "), ""),
    (re.compile(r"^Pointer '([^']*)' does not exist"), r"$ref target '#\1' does not exist"),
    (re.compile(r"^Resource '([^']*)' is not present in a registry.*"),
     r"$ref '\1' cannot be resolved (only references within the schema are supported)"),
    (re.compile(r"\.? ?Enable '\w+' option.*"), ""),
    (re.compile(r"^Unimplemented keys: "), "unsupported keywords: "),
]
_REGEX_ERROR = re.compile(r"regex parse error:.*?\berror: ([^\n]*)", re.S)


def _condense(message: str) -> str:
    """llguidance's (multi-line, sometimes source-quoting) message as one short line."""
    if m := _REGEX_ERROR.search(message):
        prefix = message[:m.start()].strip()
        message = f"{prefix} invalid regular expression in pattern: {m.group(1)}"
    else:
        message = message.strip().split("\n", 1)[0]
    message = " ".join(message.split())
    for pattern, replacement in _REWORDS:
        message = pattern.sub(replacement, message)
    message = message.strip() or "the grammar is invalid"
    return message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS - 3] + "..."


class _LRU:
    """A bounded map of grammar digest -> verdict ('' valid, else the message); shared by request threads."""

    def __init__(self, size: int):
        self._size = size
        self._items: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> str | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: tuple[str, str], value: str) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_VERDICTS = _LRU(CACHE_SIZE)
