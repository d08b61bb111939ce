"""The prefix cache's keys: a sha256 chain over block tokens, the same in every process, never Python's hash()."""

import hashlib
import subprocess
import sys

import pytest

from cluster.engine.block_manager import BlockManager, block_hash
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import Sequence


def test_block_hash_is_sha256_of_parent_and_little_endian_int32_tokens():
    tokens = [1, 2, 70000, 3]
    packed = b"".join(t.to_bytes(4, "little") for t in tokens)
    first = hashlib.sha256(packed).digest()
    assert block_hash(b"", tokens) == first
    assert block_hash(first, tokens) == hashlib.sha256(first + packed).digest()


def test_the_chain_depends_on_every_earlier_block():
    a, b = [5] * 16, [6] * 16
    assert block_hash(block_hash(b"", a), b) != block_hash(block_hash(b"", b), b)  # same last block, other prefix
    assert block_hash(b"", a) != block_hash(b"", a[:-1] + [7])


@pytest.mark.e2e  # a second interpreter
def test_keys_are_the_same_in_another_process():
    """Replicas and restarts compute the same keys."""
    code = "from cluster.engine.block_manager import block_hash; print(block_hash(b'', list(range(16))).hex())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == block_hash(b"", list(range(16))).hex()


def test_sequences_sharing_a_prefix_share_its_blocks():
    blocks = BlockManager(num_blocks=8, block_size=4)
    first = Sequence(0, "a", 0, list(range(10)), SamplingParams())
    blocks.allocate(first, 10)
    first.num_computed = 10
    blocks.register_full_blocks(first)
    second = Sequence(1, "b", 0, list(range(9)) + [99], SamplingParams())
    assert blocks.match_prefix(second) == 8  # both full blocks of the shared 9-token prefix
    assert second.block_table == first.block_table[:2]
    assert all(isinstance(h, bytes) and len(h) == 32 for h in second.block_hashes)
