"""Stop strings over streamed deltas: never emitted, held back only while undecided."""

import pytest

from cluster.engine.stop import StopStringFilter
from cluster.tokenizer import IncrementalDetokenizer, load_tokenizer


def _run(stop: tuple[str, ...], deltas: list[str]) -> tuple[list[str], StopStringFilter]:
    f = StopStringFilter(stop)
    return [f.push(d) for d in deltas], f


def test_stop_inside_one_delta():
    out, f = _run(("END",), ["Hello", " wor", "ld END here", "more"])
    assert out == ["Hello", " wor", "ld ", ""]
    assert f.stopped and f.matched == "END"
    assert f.flush() == ""


def test_stop_spanning_three_deltas():
    out, f = _run(("<|stop|>",), ["abc<|", "st", "op|>tail"])
    assert out == ["abc", "", ""]
    assert f.stopped and f.matched == "<|stop|>"
    assert f.push("after") == "" and f.flush() == ""


def test_false_start_is_held_then_released():
    out, f = _run(("ABC",), ["xA", "B", "D"])
    assert out == ["x", "", "ABD"]  # "A" and "AB" could start the stop; "ABD" cannot
    assert not f.stopped


def test_repeated_false_start_keeps_the_longest_undecided_tail():
    out, f = _run(("aab",), ["a", "a", "a", "b"])
    assert out == ["", "", "a", ""]  # "aaa": the last "aa" may still become "aab"
    assert f.stopped and "".join(out) == "a"


def test_multiple_stop_strings_the_first_to_complete_wins():
    out, f = _run(("world", "\n\n", "wor"), ["hello ", "wo", "rld"])
    assert "".join(out) == "hello " and f.matched == "wor"
    out, f = _run(("xyz", "\n\n"), ["one\n", "\ntwo xyz"])
    assert "".join(out) == "one" and f.matched == "\n\n"
    # "BC" completes before "ABCD" does, whether the text comes at once or a character at a time.
    for deltas in (["ABCD"], list("ABCD")):
        out, f = _run(("ABCD", "BC"), deltas)
        assert "".join(out) == "A" and f.matched == "BC"


def test_stop_at_the_very_start():
    out, f = _run(("Sure",), ["Sure", ", here"])
    assert out == ["", ""] and f.stopped
    out, f = _run(("Sure",), ["S", "ure!"])
    assert out == ["", ""] and f.stopped


def test_flush_releases_held_text():
    out, f = _run(("STOP",), ["go ST", "O"])
    assert out == ["go ", ""]
    assert f.flush() == "STO" and f.flush() == ""
    assert not f.stopped


def test_no_stop_strings_passes_everything_through():
    out, f = _run((), ["a", "b", ""])
    assert out == ["a", "b", ""] and f.flush() == ""
    with pytest.raises(ValueError):
        StopStringFilter(("",))


TEXT = "The quick brown fox jumps over the lazy dog; 3.14 != 22/7. Über allen Gipfeln 🤖 ist Ruh’."


@pytest.mark.parametrize("stop", ["brown fox", "ox jum", "lazy d", "14 !=", "Gipfeln 🤖 is", "🤖", "Ruh’."])
def test_streaming_with_a_real_tokenizer(stop):
    tok = load_tokenizer("v3")
    ids = tok.encode(TEXT)
    detok, f = IncrementalDetokenizer(tok.decode), StopStringFilter((stop, "never appears"))
    seen, emitted, ends = "", "", []
    for i, t in enumerate(ids):
        delta = detok.add([t])
        seen += delta
        ends.append(len(seen))
        emitted += f.push(delta)
        if f.stopped:
            break
    assert f.stopped and f.matched == stop
    assert emitted == TEXT[:TEXT.index(stop)]
    end = TEXT.index(stop) + len(stop)
    assert ends[-1] >= end and (len(ends) < 2 or ends[-2] < end)  # stopped at the token completing it
    inside = [e for e in ends if TEXT.index(stop) < e < end]  # tokens ending inside the stop string
    assert bool(inside) == (len(stop) > 1), (stop, inside)  # every stop of several characters crosses tokens


def test_streaming_without_a_match_releases_everything():
    tok = load_tokenizer("v3")
    detok, f = IncrementalDetokenizer(tok.decode), StopStringFilter(("Ruh!", "dog;x"))
    emitted = "".join(f.push(detok.add([t])) for t in tok.encode(TEXT))
    emitted += f.push(detok.flush()) + f.flush()
    assert emitted == TEXT and not f.stopped
