"""The prefix cache keeps requests apart: `cache_salt` separates tenants, and a hit needs the block's own tokens and
parent, so even a colliding hash never serves one request another's KV."""

import hashlib

import pytest

from cluster.engine.block_manager import BlockManager, block_hash, chain_root
from cluster.engine.engine import LLMEngine
from cluster.engine.sampling_params import MAX_CACHE_SALT_CHARS, SamplingParams
from cluster.engine.sequence import Sequence
from tests.test_engine import _prompts, _run


# Each engine test runs in series and with steps scheduled ahead (`EngineConfig.async_scheduling`).
pytestmark = pytest.mark.both_schedulings


BS = 4  # block size of the BlockManager-level tests


def _params(salt: str | None = None, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, cache_salt=salt, **kw)


def _computed(blocks: BlockManager, seq_id: int, prompt: list[int], salt: str | None = None) -> Sequence:
    """A sequence admitted (prefix matched), its whole prompt computed and registered, as the engine does."""
    seq = Sequence(seq_id, str(seq_id), 0, prompt, _params(salt))
    blocks.match_prefix(seq)
    blocks.allocate(seq, len(prompt) - seq.num_computed)
    seq.num_computed = len(prompt)
    blocks.register_full_blocks(seq)
    return seq


def _probe(blocks: BlockManager, prompt: list[int], salt: str | None = None) -> tuple[int, list[int]]:
    """Tokens a new sequence would find cached, and the blocks it would attach (released again)."""
    seq = Sequence(99, "probe", 0, prompt, _params(salt))
    hit, table = blocks.match_prefix(seq), list(seq.block_table)
    blocks.free_sequence(seq)
    return hit, table


# -- cache_salt ---------------------------------------------------------------------------------------------------

def test_cache_salt_is_validated_without_echoing_it():
    SamplingParams(cache_salt="t" * MAX_CACHE_SALT_CHARS)
    for bad in ("", "s" * (MAX_CACHE_SALT_CHARS + 1), 7):
        with pytest.raises(ValueError, match="cache_salt must be a non-empty string of at most 256") as e:
            SamplingParams(cache_salt=bad)
        assert "sss" not in str(e.value)


def test_a_salt_changes_every_key_of_the_chain():
    prompt = list(range(3, 3 + 5 * BS))
    chains = {}
    for salt in (None, "tenant-a", "tenant-b", "tenant-a "):
        seq = Sequence(0, "x", 0, prompt, _params(salt))
        chains[salt] = BlockManager(8, BS)._hashes(seq, 5)
    assert chain_root(None) == b"" and chains[None][0] == block_hash(b"", prompt[:BS])  # unsalted keys unchanged
    root = hashlib.sha256(b"cache_salt:tenant-a").digest()
    assert chains["tenant-a"][0] == block_hash(root, prompt[:BS])
    for a in chains:
        for b in chains:
            if a != b:
                assert not set(chains[a]) & set(chains[b]), f"salts {a!r} and {b!r} share a key"
    assert chain_root("\ud800") != chain_root("\ud801")  # lone surrogates (JSON allows them) hash, distinctly


def test_different_salts_never_share_blocks():
    blocks = BlockManager(num_blocks=32, block_size=BS)
    prompt = list(range(10, 10 + 3 * BS + 1))  # 3 full blocks, then one token to compute
    a = _computed(blocks, 0, prompt, "A")
    assert _probe(blocks, prompt, "B") == (0, [])
    assert _probe(blocks, prompt, None) == (0, [])
    assert _probe(blocks, prompt, "A") == (3 * BS, a.block_table[:3])
    plain = _computed(blocks, 1, prompt, None)
    assert plain.block_table[0] not in a.block_table  # computed afresh, not A's
    assert _probe(blocks, prompt, None) == (3 * BS, plain.block_table[:3])
    assert _probe(blocks, prompt, "A") == (3 * BS, a.block_table[:3])
    assert blocks.prefix_collisions == 0  # sha256 keys differ: these were plain misses
    for seq in (a, plain):
        blocks.free_sequence(seq)
    assert blocks.num_free == blocks.num_blocks


# -- a colliding hash ---------------------------------------------------------------------------------------------

def _tokens_only(parent: bytes, tokens: list[int]) -> bytes:
    """A weak chain: it forgets the parent (and the salt), so equal blocks collide whatever precedes them."""
    return block_hash(b"", tokens)


def test_a_key_collision_is_a_counted_miss():
    blocks = BlockManager(num_blocks=32, block_size=BS, hash_fn=lambda parent, tokens: b"\0" * 32)  # all one key
    first = _computed(blocks, 0, [1, 2, 3, 4, 5])
    hit, table = _probe(blocks, [9, 9, 9, 9, 5])
    assert (hit, table) == (0, []) and blocks.prefix_collisions == 1
    assert _probe(blocks, [1, 2, 3, 4, 5]) == (BS, first.block_table[:1])  # the same tokens still hit
    blocks.free_sequence(first)


def test_equal_tokens_after_another_prefix_or_salt_do_not_match():
    """With a hash blind to the parent, block Y after [Z, X] has the key of Y after [X]: the stored parent tells
    them apart, as does the salt of a first block."""
    X, Y, Z = [1] * BS, [2] * BS, [3] * BS
    blocks = BlockManager(num_blocks=32, block_size=BS, hash_fn=_tokens_only)
    only_x = _computed(blocks, 0, X + [7])  # X registered first, after the root
    zxy = _computed(blocks, 1, Z + X + Y + [7])  # Y registered after Z, X
    hit, table = _probe(blocks, X + Y + [7])
    assert (hit, table) == (BS, only_x.block_table[:1]), "Y computed after [Z, X] was served after [X]"
    assert blocks.prefix_collisions == 1
    assert _probe(blocks, X + [7], "salt") == (0, [])
    # The key of X after Z is taken by X after the root: [Z, X, Y] finds only Z. A collision costs hits, never KV.
    assert _probe(blocks, Z + X + Y + [7]) == (BS, zxy.block_table[:1])
    assert blocks.prefix_collisions == 3
    for seq in (only_x, zxy):
        blocks.free_sequence(seq)


def test_a_block_computed_twice_keeps_what_follows_it_findable():
    """Two sequences that computed the same prefix at once: the second's blocks are twins of the first's, and its
    own continuation (a second turn of its conversation) is still found after the first's."""
    shared, tail = list(range(20, 20 + 2 * BS)), [5] * BS
    blocks = BlockManager(num_blocks=32, block_size=BS)
    a = Sequence(0, "a", 0, shared + [1], _params())
    b = Sequence(1, "b", 0, shared + tail + [1], _params())
    for seq in (a, b):  # both admitted before either registered
        assert blocks.match_prefix(seq) == 0
        blocks.allocate(seq, seq.num_tokens)
    for seq in (a, b):
        seq.num_computed = seq.num_tokens
        blocks.register_full_blocks(seq)
    hit, table = _probe(blocks, shared + tail + [1, 2])
    assert hit == 3 * BS and table == a.block_table[:2] + b.block_table[2:3]
    for seq in (a, b):
        blocks.free_sequence(seq)


# -- through the engine -------------------------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _one(engine: LLMEngine, prompt: list[int], salt: str | None, rid: str) -> dict:
    params = SamplingParams(**{**GREEDY.__dict__, "cache_salt": salt})
    return _run(engine, {rid: (prompt, params)})[(rid, 0)]


def test_salted_requests_through_the_engine(make_engine):
    prompt = _prompts(1, 70, 71, seed=21)[0]  # 4 full blocks of 16
    engine = make_engine()
    runs = []
    for rid, salt, cached in [("a1", "A", 0), ("b", "B", 0), ("a2", "A", 64), ("plain1", None, 0),
                              ("plain2", None, 64), ("b2", "B", 64)]:
        hits = engine.blocks.prefix_hit_tokens
        r = _one(engine, prompt, salt, rid)
        assert (r["cached"], engine.blocks.prefix_hit_tokens - hits) == (cached, cached), f"{rid} (salt {salt!r})"
        runs.append(r["tokens"])
    assert engine.blocks.prefix_collisions == 0
    assert all(tokens == runs[0] for tokens in runs)  # the salt changes where KV is shared, never the output


def test_a_colliding_hash_never_serves_another_prompts_kv(make_engine, monkeypatch):
    """Prompt 2's first block is hashed as if it were prompt 1's and the rest is the same, so without the token
    check prompt 2 would take all of prompt 1's blocks (and its output)."""
    p1 = _prompts(1, 70, 71, seed=22)[0]
    p2 = _prompts(1, 16, 17, seed=23)[0] + p1[16:]
    assert p2[:16] != p1[:16]

    def colliding(parent: bytes, tokens: list[int]) -> bytes:
        return block_hash(parent, p1[:16] if tokens == p2[:16] else tokens)

    engine = make_engine()
    monkeypatch.setattr(engine.blocks, "hash_fn", colliding)
    first = _one(engine, p1, None, "one")
    second = _one(engine, p2, None, "two")
    assert second["cached"] == 0 and engine.blocks.prefix_collisions == 1
    uncached = _one(make_engine(enable_prefix_caching=False), p2, None, "two")
    assert second["tokens"] == uncached["tokens"]
    assert first["tokens"] != uncached["tokens"], "seed 22/23 prompts agree: sharing would go unseen"
    again = _one(engine, p2, None, "two-again")  # prompt 2's own blocks did not replace prompt 1's entry
    assert again["cached"] == 0 and again["tokens"] == uncached["tokens"]
