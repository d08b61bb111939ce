"""Cached incremental decoding must give the logits of one full-sequence forward."""

import pytest
import torch

from cluster.model.kv_cache import ContiguousKVCache
from cluster.model.loader import load_model


def _cache(config, slots: int, max_len: int) -> ContiguousKVCache:
    return ContiguousKVCache(config.num_layers, slots, max_len, config.num_kv_heads, config.head_dim)


def test_chunked_prefill_and_decode_match_full_forward(tiny_dir):
    lm = load_model(tiny_dir, "fp32")
    model, c = lm.model, lm.config
    tokens = torch.randint(0, c.vocab_size, (40,))

    full = _cache(c, 1, 64)
    expected = model.compute_logits(model(tokens, full.begin_step([0], [40]), full))

    inc = _cache(c, 1, 64)
    pieces = []
    start = 0
    for n in (13, 8, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1):  # prefill chunks, then one token at a time
        chunk = tokens[start:start + n]
        pieces.append(model.compute_logits(model(chunk, inc.begin_step([0], [n]), inc)))
        start += n
    assert start == 40
    got = torch.cat(pieces)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_interleaved_sequences_do_not_see_each_other(tiny_dir):
    """Two sequences advancing in the same forwards give the logits each gives alone."""
    lm = load_model(tiny_dir, "fp32")
    model, c = lm.model, lm.config
    a, b = torch.randint(0, c.vocab_size, (12,)), torch.randint(0, c.vocab_size, (5,))

    def alone(seq):
        cache = _cache(c, 1, 32)
        return model.compute_logits(model(seq, cache.begin_step([0], [len(seq)]), cache))

    both = _cache(c, 2, 32)
    first = model.compute_logits(model(torch.cat([a[:7], b[:5]]), both.begin_step([1, 0], [7, 5]), both))
    second = model.compute_logits(model(a[7:], both.begin_step([1], [5]), both))
    got_a, got_b = torch.cat([first[:7], second]), first[7:]
    for got, want in ((got_a, alone(a)), (got_b, alone(b))):
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_overflowing_a_slot_is_an_error(tiny_dir):
    lm = load_model(tiny_dir, "fp32")
    cache = _cache(lm.config, 1, 8)
    cache.begin_step([0], [6])
    with pytest.raises(ValueError, match="9 tokens, more than its 8"):
        cache.begin_step([0], [3])
