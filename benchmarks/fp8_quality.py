"""FP8 experts against the model's own dtype, teacher-forced: top-1 agreement and mean KL(reference || fp8).

    python benchmarks/fp8_quality.py [--model DIR] [--tokens 512] [--dtype bf16] [--moe-backend torch]
                                     [--fp8-activations auto|on|off]

Both models load the same checkpoint (default: the embedded `mini`, stored in bf16) in the same compute dtype; the
FP8 one quantizes its experts as they load (`--quantization fp8`), everything else is identical. With the Triton
experts, `--fp8-activations on` runs W8A8 (activations quantized per token, as GPUs from sm_89 run FP8 experts) and
`off` W8A16, wherever they run (the interpreter too). Fixed English prompts, tokenized (v3 tokenizer) and
concatenated to `--tokens` tokens, go through each model in one forward:
teacher forcing, so every position predicts the next token of the same text whatever either model would have
sampled. At each position: whether both models' most likely next token is the same, and KL(p_ref || p_fp8) of their
next-token distributions (natural log). Goals (issue 27): agreement >= 0.95, mean KL <= 0.02. Numbers go to
benchmarks/RESULTS.md.

For scale it also compares the reference with the same model in fp32 (`--floor-dtype`): how often rounding to the
reference dtype alone changes the top-1. Random weights give near-uniform next-token distributions (mini's most
likely token has a probability near 1/1000), so near-ties are everywhere and any rounding flips some of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.model.decoder import CausalLM  # noqa: E402
from cluster.model.kv_cache import ContiguousKVCache  # noqa: E402

PROMPTS = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how books were "
    "made, sold and read across Europe.",
    "Write a Python function that returns the n-th Fibonacci number using an iterative loop, and explain its "
    "running time.",
    "Mixture-of-experts models route each token to a few of many feed-forward networks, so that most of the "
    "weights stay idle for any one token.",
    "In the morning the harbour was quiet; the fishing boats had left before dawn and only the gulls remained on "
    "the stone pier.",
    "Summarise the main arguments for and against congestion pricing in large cities, with one example of each.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of plant "
    "cells.",
)


def fixed_tokens(encode, count: int) -> list[int]:
    """PROMPTS tokenized (each with its BOS) and repeated in turn until `count` tokens."""
    tokens: list[int] = []
    i = 0
    while len(tokens) < count:
        tokens += encode(PROMPTS[i % len(PROMPTS)])
        i += 1
    return tokens[:count]


@torch.inference_mode()
def teacher_forced_logits(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    """[T, V] fp32: the next-token logits at every position of `tokens`, in one forward."""
    c = model.config
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    cache = ContiguousKVCache(c.num_layers, 1, len(tokens), c.num_kv_heads, c.head_dim, dtype, device)
    positions = cache.begin_step([0], [len(tokens)])
    return model.compute_logits(model(torch.tensor(tokens, device=device), positions, cache)).float()


def compare(reference: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(reference || test)) over the positions of two [T, V] logit tensors."""
    agreement = (reference.argmax(-1) == test.argmax(-1)).double().mean().item()
    log_p, log_q = reference.double().log_softmax(-1), test.double().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return agreement, kl


def main() -> int:
    from cluster.checkpoint.default import ensure_default_checkpoint
    from cluster.config import ModelConfig
    from cluster.model.loader import load_model
    from cluster.moe.executor import LocalExpertExecutor
    from cluster.moe.triton_backend import TritonMoEBackend
    from cluster.tokenizer import load_tokenizer, resolve_tokenizer_version

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: the embedded mini checkpoint)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="both models compute in it")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--moe-backend", choices=["auto", "cpu", "torch", "triton"], default="auto")
    p.add_argument("--fp8-activations", choices=["auto", "on", "off"], default="auto",
                   help="with --moe-backend triton: W8A8 (on) or W8A16 (off); auto: W8A8 where the GPU multiplies FP8")
    p.add_argument("--floor-dtype", choices=["bf16", "fp16", "fp32", "none"], default="fp32",
                   help="also compare the reference with the whole model in this dtype (none: skip)")
    args = p.parse_args()
    if args.fp8_activations != "auto" and args.moe_backend != "triton":
        p.error("--fp8-activations chooses how the Triton experts run: add --moe-backend triton")

    model_dir = Path(args.model) if args.model else ensure_default_checkpoint("mini")
    config = ModelConfig.from_file(model_dir)
    tok = load_tokenizer(resolve_tokenizer_version(config, None))
    tokens = fixed_tokens(lambda text: tok.encode(text, bos=True), args.tokens)
    runs = [("fp8", args.dtype, "fp8")] + ([] if args.floor_dtype == "none" else [("floor", args.floor_dtype, None)])
    logits = {}
    for name, dtype, quantization in [("reference", args.dtype, None), *runs]:
        model = load_model(model_dir, dtype, args.device, args.moe_backend, quantization=quantization).model
        if quantization and args.fp8_activations != "auto":
            layers = model.moe_layers()[0].executor.layers
            backend = TritonMoEBackend(fp8_activations=args.fp8_activations == "on")
            model.attach_experts(LocalExpertExecutor(layers, config.num_experts, backend))
        logits[name] = teacher_forced_logits(model, tokens)
        del model
    agreement, kl = compare(logits["reference"], logits["fp8"])
    print(f"{model_dir.name}: {len(tokens)} tokens teacher-forced, {args.dtype} on {args.device}, experts "
          f"{args.dtype} vs fp8 (moe backend {args.moe_backend}, fp8 activations {args.fp8_activations})")
    print(f"top-1 agreement {agreement:.4f} (goal >= 0.95), mean KL {kl:.5f} nats (goal <= 0.02)")
    if "floor" in logits:
        floor_agreement, floor_kl = compare(logits["reference"], logits["floor"])
        print(f"for scale, the whole model in {args.floor_dtype} against {args.dtype}: top-1 agreement "
              f"{floor_agreement:.4f}, mean KL {floor_kl:.5f} nats")
    return 0 if agreement >= 0.95 and kl <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
