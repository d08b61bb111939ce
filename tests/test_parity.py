"""The correctness anchor: our model against transformers' reference on the same checkpoint, in fp32."""

from pathlib import Path

import pytest
import torch
import transformers

from cluster.generate import greedy_generate
from cluster.model.kv_cache import ContiguousKVCache
from cluster.model.loader import load_model

REL_TOL = 1e-5


def _reference(directory: Path) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = transformers.MixtralForCausalLM if config.model_type == "mixtral" else transformers.MistralForCausalLM
    ref = cls.from_pretrained(directory, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # compare full-length greedy runs
    ref.generation_config.pad_token_id = 0
    return ref


@pytest.fixture(scope="module", params=["moe", "dense"])
def pair(request, tiny_dir, tiny_dense_dir):
    directory = tiny_dir if request.param == "moe" else tiny_dense_dir
    return load_model(directory, "fp32"), _reference(directory)


def test_batched_logits_match_reference(pair):
    ours, ref = pair
    c = ours.config
    gen = torch.Generator().manual_seed(1234)
    lengths = [1, 7, 33, 64, 5]
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen) for n in lengths]
    # All prompts in one flat forward, as the engine batches them.
    cache = ContiguousKVCache(c.num_layers, len(prompts), 64, c.num_kv_heads, c.head_dim)
    positions = cache.begin_step(list(range(len(prompts))), lengths)
    logits = ours.model.compute_logits(ours.model(torch.cat(prompts), positions, cache))
    offset = 0
    for p in prompts:
        with torch.no_grad():
            expected = ref(p[None]).logits[0].float()
        got = logits[offset:offset + len(p)]
        offset += len(p)
        rel = ((got - expected).norm() / expected.norm()).item()
        assert rel <= REL_TOL, f"prompt of {len(p)} tokens: relative error {rel:.2e}"


def test_greedy_generation_matches_reference(pair):
    ours, ref = pair
    gen = torch.Generator().manual_seed(99)
    for n in (3, 20):
        prompt = torch.randint(0, ours.config.vocab_size, (n,), generator=gen)
        with torch.no_grad():
            expected = ref.generate(prompt[None], max_new_tokens=32, do_sample=False)[0, n:].tolist()
        got = list(greedy_generate(ours.model, prompt.tolist(), 32))
        assert len(expected) == 32
        assert got == expected
