"""Which request fields the API takes, takes without effect, and refuses (issue 24): parsed as the routes parse them
(`parse_request`), without an engine. No field is ignored silently: an unknown one is a 400 naming it, OpenAI's
fields that mean nothing here are taken, those that would change the output and are not implemented are refused,
each error naming its field; vLLM's min_tokens, stop_token_ids and continuous_usage_stats are taken."""

import json

import pytest

from cluster.api.completions import CompletionRequest
from cluster.api.errors import APIError
from cluster.api.protocol import ChatCompletionRequest, SamplingRequest
from cluster.api.streaming import parse_request
from cluster.engine.sampling_params import SamplingDefaults

MODEL = "mixtral-tiny"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
DEFAULTS = SamplingDefaults(temperature=0.5)


def _chat(**fields) -> ChatCompletionRequest:
    return parse_request(json.dumps({"messages": ASK, **fields}).encode(), ChatCompletionRequest, MODEL)


def _completion(**fields) -> CompletionRequest:
    return parse_request(json.dumps({"prompt": "Hello", **fields}).encode(), CompletionRequest, MODEL)


def _refused(parse, **fields) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(**fields)
    assert caught.value.status == 400
    return caught.value


# -- unknown fields ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parse", [_chat, _completion], ids=["chat", "completions"])
def test_an_unknown_field_is_a_400_naming_it(parse):
    error = _refused(parse, include_stop_str_in_output=True)
    assert error.param == "include_stop_str_in_output"
    assert error.message == "Unrecognized request argument supplied: 'include_stop_str_in_output'"


def test_many_unknown_fields_are_named_a_few_at_a_time():
    error = _refused(_chat, **{f"x{i}": 1 for i in range(8)}, temperature=9)
    assert error.param == "x0" and error.message.endswith("'x0', 'x1', 'x2', 'x3', 'x4' and 3 more")


def test_an_unknown_field_name_is_cut_and_quoted():
    error = _refused(_chat, **{"a\n" * 1000: 1})
    assert len(error.param) == 64 and "\\n" in error.message and "\n" not in error.message


def test_an_unknown_stream_option_is_a_400_naming_it():
    error = _refused(_chat, stream=True, stream_options={"include_usage": True, "sometimes": True})
    assert error.param == "stream_options.sometimes"


# -- OpenAI's fields: taken without effect, or refused ------------------------------------------------------------------
WITHOUT_EFFECT = {"store": True, "metadata": {"team": "a", "run": "7"}, "service_tier": "auto",
                  "prompt_cache_key": "k-1", "prompt_cache_retention": "24h",
                  "prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "safety_identifier": "u-1", "user": "u",
                  "modalities": ["text"], "verbosity": "medium", "reasoning_effort": "none"}


def test_openai_fields_without_meaning_here_are_taken_and_change_nothing():
    plain = _chat(max_tokens=3).to_sampling_params(DEFAULTS, 100)
    taken = _chat(max_tokens=3, **WITHOUT_EFFECT,
                  stream=True, stream_options={"include_obfuscation": False}).to_sampling_params(DEFAULTS, 100)
    assert taken == plain


@pytest.mark.parametrize("field, value", [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("web_search_options", {}), ("reasoning_effort", "high"), ("verbosity", "low"),
    ("moderation", {"model": "omni-moderation-latest"}), ("return_token_ids", True), ("prompt_logprobs", 0),
    ("metadata", {f"k{i}": "v" for i in range(17)}), ("metadata", {"k": "v" * 513}),
])
def test_a_field_that_would_change_the_output_is_refused_by_name(field, value):
    error = _refused(_chat, **{field: value})
    assert error.param is not None and error.param.split(".")[0] == field, error.message


@pytest.mark.parametrize("field, value", [("return_token_ids", True), ("prompt_logprobs", 1)])
def test_vllm_fields_not_implemented_are_refused_on_completions_too(field, value):
    assert _refused(_completion, **{field: value}).param == field


@pytest.mark.parametrize("field", ["audio", "prediction", "functions", "function_call", "web_search_options",
                                   "moderation", "verbosity", "reasoning_effort", "modalities", "return_token_ids",
                                   "prompt_logprobs", "store", "metadata", "min_tokens", "stop_token_ids"])
def test_every_new_field_takes_null(field):
    assert _chat(**{field: None}).to_sampling_params(DEFAULTS, 100) == _chat().to_sampling_params(DEFAULTS, 100)


def test_openai_chat_fields_are_all_declared():
    """Every field of the openai SDK's chat request is one this server declares (taken, or refused by name): none
    falls to the unknown-field rule."""
    from openai.types.chat import completion_create_params

    sdk = set(completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert sdk - set(ChatCompletionRequest.model_fields) == set()


# -- tools ----------------------------------------------------------------------------------------------------------
def test_empty_tools_are_a_400_naming_tools():
    error = _refused(_chat, tools=[])
    assert error.param == "tools" and "at least one tool" in error.message


@pytest.mark.parametrize("tool_choice", ["none", "auto", "required", {"type": "function", "function": {"name": "f"}}])
@pytest.mark.parametrize("tools", [None, []], ids=["no tools", "empty tools"])
def test_tool_choice_without_tools_is_a_400_naming_it(tool_choice, tools):
    fields = {"tool_choice": tool_choice} | ({} if tools is None else {"tools": tools})
    error = _refused(_chat, **fields)
    assert error.param == ("tool_choice" if tools is None else "tools"), error.message
    if tools is None:
        assert "only allowed when tools are given" in error.message


# -- logit_bias ------------------------------------------------------------------------------------------------------
def test_every_bad_logit_bias_key_and_value_is_named():
    bias = {"a": 1, "b": 1, "5": 500, "c": 1, "6": -300, "7": 1}
    error = _refused(_chat, logit_bias=bias)
    assert error.param == "logit_bias"
    assert "got 'a', 'b', 'c'" in error.message and "got 500 for token 5, -300 for token 6" in error.message


def test_many_bad_logit_bias_keys_are_named_a_few_at_a_time():
    error = _refused(_chat, logit_bias={f"k{i}": 1 for i in range(9)})
    assert "'k0', 'k1', 'k2', 'k3', 'k4' and 4 more" in error.message


def test_every_logit_bias_id_outside_the_vocabulary_is_named():
    req = _chat(logit_bias={"40000": 1, "5": 1, "40001": 2})
    with pytest.raises(ValueError, match=r"names tokens 40000, 40001, outside the vocabulary \(ids 0\.\.32767\)$"):
        req.logit_bias_pairs(32768)


# -- vLLM's extensions ---------------------------------------------------------------------------------------------------
def test_min_tokens_and_stop_token_ids_reach_the_engine():
    params = _chat(max_tokens=8, min_tokens=3, stop_token_ids=[7, 2, 7]).to_sampling_params(DEFAULTS, 100)
    assert (params.min_tokens, params.stop_token_ids) == (3, (7, 2))
    params = _completion(max_tokens=8, min_tokens=3, stop_token_ids=[9]).to_sampling_params(DEFAULTS, 100)
    assert (params.min_tokens, params.stop_token_ids) == (3, (9,))


def test_min_tokens_above_max_tokens_is_a_400_naming_it():
    with pytest.raises(APIError) as caught:
        _chat(max_tokens=4, min_tokens=5).to_sampling_params(DEFAULTS, 100)
    assert caught.value.param == "min_tokens" and "(5)" in caught.value.message
    with pytest.raises(APIError) as caught:  # the default max_tokens: the context the prompt leaves
        _chat(min_tokens=50).to_sampling_params(DEFAULTS, 40)
    assert caught.value.param == "min_tokens" and "max_tokens (40)" in caught.value.message


@pytest.mark.parametrize("ids, param", [([-1], "stop_token_ids[0]"), (list(range(65)), "stop_token_ids"),
                                        (["2"], "stop_token_ids[0]"), ([1.0], "stop_token_ids[0]"),
                                        (3, "stop_token_ids")])
def test_bad_stop_token_ids_are_a_400_naming_them(ids, param):
    assert _refused(_chat, stop_token_ids=ids).param == param


def test_stop_token_ids_outside_the_vocabulary_are_named():
    with pytest.raises(ValueError, match=r"names tokens 100, 5000, outside the vocabulary \(ids 0\.\.99\)$"):
        _chat(stop_token_ids=[3, 100, 5000]).check_stop_token_ids(100)


@pytest.mark.parametrize("options, final, every", [
    ({"include_usage": True}, True, False), ({"continuous_usage_stats": True}, True, True),
    ({"include_usage": True, "continuous_usage_stats": False}, True, False), ({}, False, False)])
def test_continuous_usage_stats_puts_usage_in_every_chunk(options, final, every):
    req: SamplingRequest = _chat(stream=True, stream_options=options)
    assert (req.include_usage, req.continuous_usage) == (final, every)
