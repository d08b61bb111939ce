"""The offline mistral-common tokenizers: round trips, chat and tool encoding, streaming detokenization."""

import random

import pytest

from cluster.checkpoint.presets import preset
from cluster.tokenizer import IncrementalDetokenizer, TokenizerError, load_tokenizer, resolve_tokenizer_version
from tests.conftest import TINY_DENSE

# The five languages of the model card, with the characters that stress byte fallback.
TEXTS = {
    "en": "The quick brown fox jumps over the lazy dog; 3.14 != 22/7.",
    "fr": "Le cœur a ses raisons que la raison ne connaît point. « Où êtes-vous ? »",
    "it": "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura, ché la diritta via era smarrita.",
    "de": "Über allen Gipfeln ist Ruh’, in allen Wipfeln spürest du kaum einen Hauch. Straße, Größe, Mädchen.",
    "es": "¿Dónde está la biblioteca? ¡Mañana será otro día, señor Muñoz!",
}
STRESS = "emoji 🤖👍🏽 and CJK 日本語の文章 and math ∑ᵢ xᵢ² ≤ ∞\n\ttabs  double  spaces"


@pytest.fixture(scope="module", params=["v1", "v3"])
def tok(request):
    return load_tokenizer(request.param)


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_round_trip_five_languages(tok, lang):
    ids = tok.encode(TEXTS[lang])
    assert len(ids) > 5
    assert tok.decode(ids) == TEXTS[lang]


def test_round_trip_byte_fallback(tok):
    ids = tok.encode(STRESS)
    assert any(tok.piece(i).startswith("<0x") for i in ids)  # some characters only exist as bytes
    assert tok.decode(ids) == STRESS


def _stream(tok, ids, step=1):
    d = IncrementalDetokenizer(tok.decode)
    deltas = [d.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    return deltas, d.flush()


@pytest.mark.parametrize("step", [1, 3])
def test_streamed_text_equals_the_whole_decode(tok, step):
    for text in [*TEXTS.values(), STRESS]:
        deltas, rest = _stream(tok, tok.encode(text), step)
        assert "".join(deltas) + rest == text
        assert rest == ""
        assert all("\ufffd" not in d for d in deltas)  # never half a character


def test_multibyte_character_is_held_until_complete(tok):
    ids = tok.encode("🤖")
    byte_tokens = [i for i in ids if tok.piece(i).startswith("<0x")]
    assert len(byte_tokens) == 4  # one 4-byte character, one token a byte
    d = IncrementalDetokenizer(tok.decode)
    out = [d.add([i]) for i in ids]
    assert "".join(out[:-1]).strip() == ""  # nothing but the leading space before the last byte
    assert out[-1].endswith("🤖")


def test_streaming_random_tokens(tok):
    rng = random.Random(7)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(30)]
        deltas, rest = _stream(tok, ids)
        assert "".join(deltas) + rest == tok.decode(ids)


def test_v3_chat_with_tools_uses_control_tokens():
    tok = load_tokenizer("v3")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "a1B2c3D4e", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "22C and sunny"},
    ]
    ids = tok.encode_chat(messages, tools)
    control = {name: tok.control_token(name) for name in ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[INST]",
                                                          "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                                                          "[/TOOL_RESULTS]")}
    assert ids[0] == tok.bos_id
    positions = {name: ids.index(i) for name, i in control.items()}
    assert (positions["[AVAILABLE_TOOLS]"] < positions["[/AVAILABLE_TOOLS]"] < positions["[INST]"]
            < positions["[/INST]"] < positions["[TOOL_CALLS]"] < positions["[TOOL_RESULTS]"]
            < positions["[/TOOL_RESULTS]"])
    assert "get_weather" in tok.decode(ids) and "22C and sunny" in tok.decode(ids)


def test_v1_chat_template():
    tok = load_tokenizer("v1")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"}])
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1  # the finished assistant turn ends with </s>
    assert tok.decode(ids) == "[INST] Hi [/INST] Hello! [INST] Bye [/INST]"  # v1 spells [INST] in plain text


def test_bad_chat_is_a_tokenizer_error():
    with pytest.raises(TokenizerError, match="cannot encode the chat"):
        load_tokenizer("v3").encode_chat([{"role": "wizard", "content": "hi"}])


def test_version_from_config_or_vocab():
    assert resolve_tokenizer_version(preset("tiny")) == "v3"
    assert resolve_tokenizer_version(TINY_DENSE) == "v1"
    assert resolve_tokenizer_version(preset("tiny"), "v1") == "v1"
    odd = preset("tiny").__class__(**{**preset("tiny").summary(), "vocab_size": 1000, "tokenizer_version": None})
    with pytest.raises(TokenizerError, match="vocab_size 1000"):
        resolve_tokenizer_version(odd)
