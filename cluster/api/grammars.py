"""Grammars for structured output: a JSON schema (response_format) and forced tool calls (tool_choice), as
llguidance grammar strings that `SamplingParams.grammar` carries to the engine.

JSON is written without flexible whitespace, with ", " and ": " as separators, so an output's length is bounded by
its content and a tool call reads exactly like mistral-common's v3 format:
`[TOOL_CALLS] [{"name": "f", "arguments": {...}}]`. A function without parameters takes exactly `{}`. A client's
schema is bounded (JSON text size, nesting depth) before llguidance sees it.

`check_grammar` is the server's verdict on a grammar, given before a request is queued: llguidance must compile it
(without panicking), and an output must exist within the request's max_tokens, which the search for a way to the
end that guided decoding keeps (cluster/engine/grammar_paths.py) shows from the grammar's start. That search also
meets the limits llguidance sets on the work a grammar may make it do (a schema that is its own required member
has no finite output: llguidance stops at "too many items"). Each refusal is one short line a client can read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cluster.engine.grammar_paths import PathFinder, PathTimeout, is_panic

log = logging.getLogger(__name__)

MAX_SCHEMA_CHARS = 64 * 1024  # one schema's JSON text (a response_format schema, or one tool's parameters)
MAX_SCHEMA_DEPTH = 64  # nesting of objects and arrays in one schema's JSON text
MAX_TOOLS = 128  # OpenAI's own limit on tools per request
MAX_TOOL_SCHEMA_CHARS = 512 * 1024  # all tools of one request together
MAX_ERROR_CHARS = 200
CACHE_SIZE = 1024  # grammar verdicts kept, by sha256 of the grammar
CHECK_SECONDS = 2.0  # the search for an output within max_tokens, per grammar (within the request's tokenize budget)

# Output format of every grammar here: compact JSON with the separators mistral-common writes.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# What a function without parameters is given (protocol.ToolDefinition.to_dict shows the model this one).
_EMPTY_PARAMETERS = ({}, {"type": "object", "properties": {}})


class GrammarError(ValueError):
    """A schema or grammar the server cannot enforce; the message is for the client (no library internals)."""


def _grammar_engine() -> Any:
    """The llguidance module; a refusal where it is not installed (the engine then runs without a grammar guide)."""
    try:
        import llguidance
    except ImportError:
        raise GrammarError("this server does not enforce output formats (it runs without a grammar engine)") from None
    return llguidance


def json_grammar(schema: dict | None) -> str:
    """The grammar of JSON text that matches `schema`; None: any JSON object (response_format json_object)."""
    llguidance = _grammar_engine()

    schema = _ANY_OBJECT if schema is None else _client_schema(schema, "the JSON schema")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:  # the schema is not JSON (it cannot be after _client_schema; kept as a guard)
        raise GrammarError(f"the JSON schema is not valid JSON: {_condense(str(e))}") from e
    except BaseException as e:
        if not is_panic(e):
            raise
        raise _panicked(e) from None


def tool_call_grammar(tools: list[dict], name: str | None, parallel: bool) -> str:
    """The grammar of a v3 tool-call turn: `<TOOL_CALLS>`, a space, then a JSON array of calls, each
    `{"name": <a tool's name>, "arguments": <its parameters>}` (only `name`'s when given; one call unless parallel).
    tools: OpenAI tool dicts ({"type": "function", "function": {"name", "description"?, "parameters"?}})."""
    llguidance = _grammar_engine()

    calls = {"type": "array", "items": {"anyOf": _call_schemas(tools, name)}, "minItems": 1,
             "x-guidance": JSON_OPTIONS}
    if not parallel:
        calls["maxItems"] = 1
    text = json.dumps(calls, ensure_ascii=True)  # one line: strings inside are escaped, so lark reads it whole
    if len(text) > MAX_TOOL_SCHEMA_CHARS:
        raise GrammarError(f"the tools' schemas are too large ({len(text)} characters of JSON; "
                           f"at most {MAX_TOOL_SCHEMA_CHARS})")
    return llguidance.LLMatcher.grammar_from_lark(f'start: <TOOL_CALLS> " " calls\ncalls: %json {text}\n')


def check_grammar(grammar: str, tokenizer_version: str, max_tokens: int) -> None:
    """Raise GrammarError unless llguidance can enforce `grammar` with that tokenizer and an output of at most
    `max_tokens` tokens exists. Verdicts are cached by the grammar's digest, so a schema a client repeats is
    judged once (again only for a larger max_tokens than one it was found to need more than)."""
    key = (hashlib.sha256(grammar.encode("utf-8", "surrogatepass")).hexdigest(), tokenizer_version)
    verdict = _VERDICTS.get(key)
    if verdict is None or verdict.undecided(max_tokens):
        verdict = _judge(grammar, tokenizer_version, max_tokens)
        _VERDICTS.put(key, verdict)
    verdict.raise_for(max_tokens)


@dataclass(frozen=True)
class _Verdict:
    error: str = ""  # why the grammar cannot be enforced at all ("" it can)
    needs: int | None = None  # the tokens of the output found from its start
    searched: int = 0  # when none was found: within how many tokens

    def undecided(self, max_tokens: int) -> bool:
        return not self.error and self.needs is None and self.searched < max_tokens

    def raise_for(self, max_tokens: int) -> None:
        if self.error:
            raise GrammarError(self.error)
        if self.needs is None:
            raise GrammarError(f"the output format has no output of at most {max_tokens} tokens (max_tokens): its "
                               f"required parts are longer, or it has no end")
        if self.needs > max_tokens:
            raise GrammarError(f"the output format needs {self.needs} tokens to write its required parts, more than "
                               f"max_tokens ({max_tokens})")


def _judge(grammar: str, tokenizer_version: str, max_tokens: int) -> _Verdict:
    llguidance = _grammar_engine()

    from cluster.tokenizer.grammar import grammar_tokenizer

    try:
        matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer_version), grammar, log_level=0)
        if matcher.is_error():
            return _Verdict(f"invalid JSON schema: {_condense(matcher.get_error())}")
        path = _path_finder(tokenizer_version).find(matcher, max_tokens, deadline=time.monotonic() + CHECK_SECONDS)
    except PathTimeout:  # depends on how busy the machine is: this request's answer, never cached for the next
        raise GrammarError(f"the output format is too complex: no output of at most {max_tokens} tokens was found "
                           f"within {CHECK_SECONDS:g} s") from None
    except BaseException as e:
        if not is_panic(e):
            raise
        return _Verdict(str(_panicked(e)))
    if matcher.is_error():  # a limit of the grammar engine, met on the way to the end
        return _Verdict(f"the output format cannot be enforced: {_condense(matcher.get_error())}")
    return _Verdict(needs=len(path)) if path is not None else _Verdict(searched=max_tokens)


@lru_cache(maxsize=None)
def _path_finder(tokenizer_version: str) -> PathFinder:
    from cluster.tokenizer.grammar import grammar_tokenizer, special_token_ids, token_bytes

    return PathFinder(token_bytes(tokenizer_version), special_token_ids(tokenizer_version),
                      grammar_tokenizer(tokenizer_version).eos_token)


def _panicked(e: BaseException) -> GrammarError:
    """A panic inside llguidance on a client's schema: a refusal, logged without the schema's text."""
    log.warning("the grammar engine panicked on a client's schema (%s)", type(e).__name__)
    return GrammarError("the JSON schema cannot be enforced: the grammar engine cannot read it (check the types of "
                        "its keywords' values)")


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
        if parameters is None or parameters in _EMPTY_PARAMETERS:
            parameters = _NO_ARGUMENTS  # an empty parameter list: the arguments are {}, nothing invented
        else:
            parameters = _client_schema(parameters, f"tools[{i}].function.parameters")
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
    if problem := _mistyped_keyword(schema):
        raise GrammarError(f"invalid JSON schema: {problem}")
    return {k: v for k, v in schema.items() if k != "x-guidance"}


# Keywords whose values llguidance reads as numbers, strings or string lists. It quotes a value of another type in
# its error, and panics doing so on some (long text with characters of several bytes): they are refused here.
_NUMBER_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minimum",
                    "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_STRING_KEYWORDS = ("pattern", "format", "$ref")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems", "items")
_SCHEMAS = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
            "propertyNames", "unevaluatedItems", "unevaluatedProperties")


def _mistyped_keyword(schema: dict) -> str:
    """'' if every keyword llguidance reads as a number, a string or a list of strings has one, else what is wrong
    (the keyword's place, never its value). Walks subschemas only, not data (const, enum, default, examples)."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue
        for key in _NUMBER_KEYWORDS:
            value = node.get(key)
            if key in node and (not isinstance(value, (int, float)) or isinstance(value, bool)) and \
                    not (key.startswith("exclusive") and isinstance(value, bool)):
                return f"{where or '/'}: {key} must be a number"
        for key in _STRING_KEYWORDS:
            if key in node and not isinstance(node[key], str):
                return f"{where or '/'}: {key} must be a string"
        if "required" in node and not (isinstance(node["required"], list)
                                       and all(isinstance(k, str) for k in node["required"])):
            return f"{where or '/'}: required must be a list of property names"
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((v, f"{where}/{key}/{_pointer(k)}") for k, v in node[key].items())
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend((v, f"{where}/{key}/{i}") for i, v in enumerate(node[key]))
        stack.extend((node[key], f"{where}/{key}") for key in _SCHEMAS if isinstance(node.get(key), dict))
    return ""


def _pointer(key: str) -> str:
    """A property name as a JSON-pointer step, cut short (it is the client's text)."""
    key = key.replace("~", "~0").replace("/", "~1")
    return key if len(key) <= 40 else key[:37] + "..."


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
    (re.compile(r"^(parser|lexer) error: ", re.I), ""),
    (re.compile(r"^Too many items \(limit (\d+)[^)]*\).*"), r"it makes the grammar engine track too many items (its "
                                                             r"limit is \1), e.g. a schema that requires itself"),
    (re.compile(r"^too many expressions constructed.*"), "a string or pattern too large for the grammar engine"),
    (re.compile(r"^panic: .*"), "the grammar engine cannot read it (check the types of its keywords' values)"),
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
    """A bounded map of (grammar digest, tokenizer) -> its verdict; shared by request threads."""

    def __init__(self, size: int):
        self._size = size
        self._items: OrderedDict[tuple[str, str], _Verdict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> _Verdict | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: tuple[str, str], value: _Verdict) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_VERDICTS = _LRU(CACHE_SIZE)
