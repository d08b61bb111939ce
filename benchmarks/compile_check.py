"""Compile every Triton kernel of the project ahead of time for a GPU target, on a machine without a GPU.

    python benchmarks/compile_check.py [--quick] [--arch 90] [--out FILE] [--groups 1,2,4,6,8] ...

Why: the kernels otherwise only ever run under the CPU interpreter, which neither compiles them nor enforces what a
GPU does (tl.dot shapes and dtypes, register and shared-memory budgets), and device time is scarce. This finds a
compile error, a register spill or a block that does not fit in shared memory here, for the Triton that is installed.

How: the launchers themselves run (`paged_decode`, `paged_prefill`, `store_kv`, `fused_experts`, `align_pairs_triton`,
the glue's `add_rms_norm`, `rotary` and `route`), on meta tensors of the real models' shapes (no memory, no data), so
what compiles is what they would launch: the same constexprs, the same int and alignment specialisation of every
argument (meta tensors sit at address 0, aligned like fresh CUDA allocations). A stub driver answers the target, and
Triton's `jit_cache_hook` takes each launch's (signature, constexprs, attributes, options) instead of letting it compile
and run; each one is then compiled through the public ahead-of-time path, `triton.compile(ASTSource(...),
target=GPUTarget(...))`; the registers and spills are read from the `ptxas -v` log of that compile. Shared memory is the
compiled metadata's.

Fails (exit 1) on a compile error, a spill, shared memory over the target's per-block limit, or more registers than
one SM holds for the block. Needs no GPU, no Ray, no interpreter (TRITON_INTERPRET is cleared before any kernel is
defined). `--quick` compiles a handful of variants (the fast test runs it).

Legend: G = query heads per kv head, Dh = head dim, S = decode context splits, E = local experts, M = tokens.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before any @triton.jit runs: compiled kernels, not interpreted ones

import argparse
import contextlib
import importlib
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.dtype import DTYPE_CHOICES, parse_dtype  # noqa: E402
from cluster.kernels.align import align_pairs_torch, align_pairs_triton  # noqa: E402
from cluster.kernels.fp8 import FP8  # noqa: E402
from cluster.kernels import glue  # noqa: E402
from cluster.kernels.fused_moe import fused_experts  # noqa: E402
from cluster.kernels.paged_attention import (decode_split_counts, paged_decode, paged_prefill,  # noqa: E402
                                            store_kv)
from cluster.kernels.tuning import MoEConfig, config_buckets, dtype_key, load_configs  # noqa: E402

META = torch.device("meta")
# Per-block shared memory a kernel may opt into, by compute capability (CUDA's documented limits).
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
REGS_PER_SM = 65536
FP8_MODES = ("w8a16", "w8a8")  # FP8 experts: weights widened in the kernel, or FP8 dots (`cluster.kernels.fused_moe`)


# -- capture: run a launcher, keep what it would compile -----------------------------------------------------------


@dataclass
class Launch:
    """One distinct compiled variant a launcher asked for (picklable: the kernel travels by module and name)."""

    module: str
    kernel: str
    case: str  # the launcher call that first asked for it
    signature: dict
    constexprs: dict  # {(arg index,): value}, as the JIT passes them to ASTSource
    attrs: dict  # {(arg index,): [[attr, value]]}: the divisibility specialisation
    options: dict

    @property
    def fn(self):
        return getattr(importlib.import_module(self.module), self.kernel)

    def constexpr_names(self) -> dict:
        names = self.fn.arg_names
        return {names[path[0]]: value for path, value in self.constexprs.items()}


class _TargetDriver:
    """Just enough of a Triton driver for `JITFunction.run` to bind arguments for `target` (it never launches)."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


class Recorder:
    """Runs launchers inside `capture`; keeps one `Launch` per distinct JIT key they ask for."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self.case = ""
        self._seen: set[tuple[str, str]] = set()

    def run(self, case: str, thunk: Callable[[], object]) -> None:
        self.case = case
        thunk()

    def hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:  # noqa: A002 (Triton's)
        """Triton's jit_cache_hook: called where the JIT would compile; True skips the compile and the launch."""
        jit_fn = fn.jit_function
        ident = (jit_fn.__name__, str(key))
        if ident not in self._seen:
            self._seen.add(ident)
            opts = json.loads(compile["specialization_data"])["options"]
            # Scalars only: the lists (fp8 dtypes, dot precisions) are re-derived by the backend from the target.
            options = {k: v for k, v in opts.items() if not isinstance(v, (list, dict))}
            options["extern_libs"] = compile["extern_libs"]
            self.launches.append(Launch(jit_fn.module, jit_fn.__name__, self.case, dict(compile["signature"]),
                                        dict(compile["constants"]), dict(compile["configs"][0]), options))
        return True


@contextlib.contextmanager
def capture(target) -> Iterator[Recorder]:
    """Within: kernel launches bind their arguments for `target` and are recorded instead of compiled and run."""
    from triton import knobs
    from triton.runtime.driver import driver

    recorder = Recorder()
    previous_driver, previous_hook = getattr(driver, "_active", None), knobs.runtime.jit_cache_hook
    driver.set_active(_TargetDriver(target))
    knobs.runtime.jit_cache_hook = recorder.hook
    try:
        yield recorder
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver  # no public way back to "not chosen yet" (the default raises on CPU)


# -- the variants the launchers can ask for -------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to compile. Defaults: every dtype and head dim the models use, GQA 1..8, Mixtral's shapes."""

    dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")
    head_dims: tuple[int, ...] = (64, 128)
    groups: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    kv_heads: int = 8
    block_size: int = 16
    max_context: int = 65536
    cache_gib: float = 100.0  # KV cache size the strides are taken from (all layers, K and V)
    layers: int = 56
    splits: tuple[int, ...] | None = None  # None: every count `decode_splits` picks (see split_counts)
    num_sms: int = 132
    hidden: int = 6144
    ffn: int = 16384
    experts: int = 8  # local experts of the shard (E)
    top_k: int = 2
    moe_max_tokens: int = 8192
    tuned_device: str | None = None  # also compile the tuned configs stored for this device name
    align_experts: tuple[int, ...] = (1, 2, 4, 8)
    fp8: tuple[str, ...] = FP8_MODES  # FP8 expert modes compiled beside the plain weights
    smem: int | None = None  # the target's shared memory per block, which picks the default MoE tiles (None: sm_90's)


QUICK = Plan(dtypes=("bf16",), head_dims=(128,), groups=(6,), splits=(1, 3), moe_max_tokens=32,
             align_experts=(8,))


def split_counts(plan: Plan) -> list[int]:
    """Every split count the decode launcher can pick for this GPU and context (or the ones asked for)."""
    if plan.splits is not None:
        return sorted(set(plan.splits))
    max_blocks = -(-plan.max_context // plan.block_size)
    return list(decode_split_counts(plan.kv_heads, max_blocks, plan.block_size, plan.num_sms))


def _cache(plan: Plan, dtype: torch.dtype, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's k/v views of the engine's [L, KV, N + 1, bs, Dh] cache, sized like a `cache_gib` cache."""
    per_block = 2 * plan.layers * plan.kv_heads * plan.block_size * head_dim * dtype.itemsize
    blocks = max(1, int(plan.cache_gib * 2**30) // per_block)
    shape = (plan.layers, plan.kv_heads, blocks + 1, plan.block_size, head_dim)
    k, v = torch.empty(shape, dtype=dtype, device=META), torch.empty(shape, dtype=dtype, device=META)
    return k[1], v[1]


def _packed(shape: tuple[int, ...], offset: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A view `offset` elements into a packed buffer, the way the model runner hands out step metadata (and the token
    channel router weights): its address is only as aligned as the offset makes it."""
    return torch.empty(math.prod(shape) + offset, dtype=dtype, device=META)[offset:].view(shape)


def attention_cases(plan: Plan) -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, launcher call) for decode (each split count), prefill (pure and after decodes, one sequence or
    several, as TritonAttentionBackend launches it) and the KV write, per dtype x head dim x group; each with its
    metadata at the layouts a step can give it (table width: static, odd or 1; views aligned or not), which must
    not add variants."""
    static = -(-plan.max_context // plan.block_size)  # the model runner's static table width
    layouts = ((static, 0), (7, 1), (1, 3))  # (table width, metadata offset in int32 elements)
    splits = split_counts(plan)
    for name in plan.dtypes:
        dtype = parse_dtype(name)
        for head_dim in plan.head_dims:
            kc, vc = _cache(plan, dtype, head_dim)
            scale = head_dim ** -0.5
            for group in plan.groups:
                heads = group * plan.kv_heads
                tag = f"{name} Dh={head_dim} G={group}"
                for s, (width, off) in ((s, lay) for s in splits for lay in layouts):
                    q = torch.empty(4, heads, head_dim, dtype=dtype, device=META)
                    tables, lens = _packed((4, width), off), _packed((4,), off)
                    yield (f"{tag} S={s} width={width} offset={off}", lambda q=q, t=tables, n=lens, s=s:
                           paged_decode(q, kc, vc, t, n, scale, torch.empty_like(q), s))
                for (first, seqs), (width, off) in ((fs, lay) for fs in ((0, 3), (0, 1), (2, 3), (1, 1))
                                                    for lay in layouts):
                    q = torch.empty(first + 64 * seqs, heads, head_dim, dtype=dtype, device=META)
                    b = first + seqs
                    tables, lens, qsl = _packed((b, width), off), _packed((b,), off), _packed((b + 1,), off)
                    yield (f"{tag} first={first} seqs={seqs} width={width} offset={off}",
                           lambda q=q, t=tables, n=lens, l=qsl, f=first, m=seqs:
                           paged_prefill(q, kc, vc, t, n, l, scale, torch.empty_like(q), first_seq=f, num_seqs=m))
            for off in (0, 1):
                k = torch.empty(5, plan.kv_heads, head_dim, dtype=dtype, device=META)
                yield (f"{name} Dh={head_dim} store offset={off}",
                       lambda k=k, s=_packed((5,), off): store_kv(k, torch.empty_like(k), kc, vc, s))


def moe_configs(plan: Plan, dtype: torch.dtype, fp8_weights: bool = False) -> list[tuple[int, MoEConfig]]:
    """(first M, config) of every distinct config serving up to `moe_max_tokens` in `dtype` can use: the M buckets
    of `tuning.config_buckets` (what `TritonMoEBackend.warm_up` compiles), plus a device's tuned table if asked."""
    out: list[tuple[int, MoEConfig]] = []
    for m, _, cfg in config_buckets(plan.moe_max_tokens, plan.experts, plan.ffn, META, dtype, fp8_weights, plan.smem):
        if all(cfg != seen for _, seen in out):
            out.append((m, cfg))
    if plan.tuned_device:
        table = load_configs(plan.experts, plan.ffn, plan.tuned_device, dtype_key(dtype, fp8_weights)) or {}
        for m, cfg in sorted(table.items()):
            if cfg is not None and all(cfg != seen for _, seen in out):  # None: "default", compiled above
                out.append((m, cfg))
    return out


def moe_cases(plan: Plan) -> Iterator[tuple[str, Callable[[], object]]]:
    """fused_experts (gate_up + down) per dtype x config, with the backend's argument dtypes: activations in the
    weights' dtype, int64 router ids, fp32 router weights; and per FP8 mode, FP8 weights with float32 scales and
    activations in the dtype (W8A8 adds the activations' quantization kernel)."""
    e, d, f, k = plan.experts, plan.hidden, plan.ffn, plan.top_k
    expert_map = torch.empty(e, dtype=torch.int32, device=META)
    scales = {"w13_scale": torch.empty(e, 2 * f, device=META), "w2_scale": torch.empty(e, d, device=META)}
    for name, mode in ((name, mode) for name in plan.dtypes for mode in (None, *plan.fp8)):
        dtype = parse_dtype(name)
        held = FP8 if mode else dtype
        w13 = torch.empty(e, 2 * f, d, dtype=held, device=META)  # [E, 2F, D]
        w2 = torch.empty(e, d, f, dtype=held, device=META)  # [E, D, F]
        fp8 = {} if mode is None else {**scales, "fp8_activations": mode == "w8a8"}
        for (m, cfg), off in ((mc, off) for mc in moe_configs(plan, dtype, mode is not None) for off in (0, 1)):
            x = torch.empty(m, d, dtype=dtype, device=META)
            ids = torch.empty(m, k, dtype=torch.int64, device=META)
            weights = _packed((m, k), off, torch.float32)  # a frame's router weights: aligned or not
            label = (f"{name}{' ' + mode if mode else ''} M={m} gate_up={_cfg(cfg.gate_up)} down={_cfg(cfg.down)} "
                     f"offset={off}")
            yield label, lambda x=x, w13=w13, w2=w2, ids=ids, w=weights, cfg=cfg, fp8=fp8: fused_experts(
                x, w13, w2, w, align_pairs_torch(ids, expert_map, e, cfg.block_m), cfg, **fp8)


def align_cases(plan: Plan) -> Iterator[tuple[str, Callable[[], object]]]:
    """align_pairs_triton per local-expert count x BLOCK_M of the configs x id dtype (router int64, channel int32)."""
    block_ms = sorted({cfg.block_m for name in plan.dtypes for _, cfg in moe_configs(plan, parse_dtype(name))})
    for e in plan.align_experts:
        expert_map = torch.empty(max(e, plan.experts), dtype=torch.int32, device=META)
        for bm in block_ms:
            for id_dtype in (torch.int64, torch.int32):
                ids = torch.empty(7, plan.top_k, dtype=id_dtype, device=META)
                label = f"E={e} BLOCK_M={bm} ids={str(id_dtype).removeprefix('torch.')}"
                yield label, lambda ids=ids, m=expert_map, e=e, bm=bm: align_pairs_triton(ids, m, e, bm)


def glue_cases(plan: Plan) -> Iterator[tuple[str, Callable[[], object]]]:
    """The fused glue per dtype: add_rms_norm (with and without a residual) at the hidden size, rotary per head dim x
    group (positions as packed int32 views at any offset), route (with and without the count, a layer's row of the
    [L, E] counts); each at several token counts, which must not add variants."""
    d, e, k = plan.hidden, plan.experts, plan.top_k
    counts = torch.empty(plan.layers, e, dtype=torch.int64, device=META)  # [L, E]
    for name in plan.dtypes:
        dtype = parse_dtype(name)
        weight = torch.empty(d, dtype=dtype, device=META)
        for t in (1, 5, 64):
            x = torch.empty(t, d, dtype=dtype, device=META)
            for residual in (None, torch.empty_like(x)):
                yield (f"{name} D={d} T={t}{'' if residual is None else ' +residual'}",
                       lambda x=x, r=residual: glue.add_rms_norm(x, weight, 1e-5, r))
            for head_dim, group in ((hd, gr) for hd in plan.head_dims for gr in plan.groups):
                heads = group * plan.kv_heads
                q = torch.empty(t, heads, head_dim, dtype=dtype, device=META)
                kk = torch.empty(t, plan.kv_heads, head_dim, dtype=dtype, device=META)
                inv_freq = torch.empty(head_dim // 2, device=META)
                for off in (0, 1, 3):
                    yield (f"{name} Dh={head_dim} H={heads} T={t} positions offset={off}",
                           lambda q=q, kk=kk, f=inv_freq, pos=_packed((t,), off): glue.rotary(pos, q, kk, f))
            logits = torch.empty(t, e, dtype=dtype, device=META)
            count_w = torch.empty(t, k, dtype=torch.int64, device=META)
            yield f"{name} E={e} K={k} T={t}", lambda lg=logits: glue.route(lg, k)
            for layer in (0, 1):
                yield (f"{name} E={e} K={k} T={t} counted in layer {layer}",
                       lambda lg=logits, cw=count_w, row=counts[layer]: glue.route(lg, k, row, cw))


def _cfg(c) -> str:
    return f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}/w{c.num_warps}s{c.num_stages}"


# -- compile and measure --------------------------------------------------------------------------------------------


@dataclass
class Row:
    kernel: str
    case: str
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    signature: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, stack and spills from a `ptxas -v` log (the largest over its functions)."""
    stats = {}
    for key, pattern in _PTXAS.items():
        found = pattern.findall(log)
        if not found:
            raise RuntimeError(f"no '{key}' in the ptxas log:\n{log}")
        stats[key] = max(int(x) for x in found)
    return stats


def compile_launch(launch: Launch, target) -> Row:
    """Compile one variant through the public AOT path. Triton itself runs ptxas (with whatever flags this version
    passes it, e.g. 3.9's --regAllocOptLevel=2) and prints its -v log when asked; always_compile makes it run even for
    a variant in Triton's cache, so the numbers are this compiler's."""
    from triton import knobs
    from triton.compiler import ASTSource

    row = Row(launch.kernel, launch.case, launch.options.get("num_warps", 4), launch.options.get("num_stages", 3),
              signature={k: v for k, v in launch.signature.items() if v != "constexpr"},
              constexprs={k: repr(v) for k, v in launch.constexpr_names().items()})
    start = time.perf_counter()
    log = io.StringIO()
    try:
        src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=target, options=launch.options)
        row.shared = compiled.metadata.shared
        if target.backend == "cuda":
            for key, value in parse_ptxas_log(log.getvalue()).items():
                setattr(row, key, value)
    except Exception as exc:  # a compile error is a result here, reported with the others
        row.problems.append(f"compile error: {type(exc).__name__}: {str(exc).strip()[:2000]}")
    row.seconds = time.perf_counter() - start
    if row.spill_stores or row.spill_loads:
        row.problems.append(f"spills: {row.spill_stores} B stored, {row.spill_loads} B loaded")
    limit = SMEM_LIMIT.get(target.arch)
    if row.shared is not None and limit is not None and row.shared > limit:
        row.problems.append(f"shared memory {row.shared} B > {limit} B per block on sm_{target.arch}")
    if row.registers is not None and row.registers * row.num_warps * target.warp_size > REGS_PER_SM:
        row.problems.append(f"{row.registers} registers x {row.num_warps * target.warp_size} threads > {REGS_PER_SM}")
    return row


def collect(plan: Plan, target, kernels: set[str]) -> tuple[list[Launch], list[Row]]:
    """Run the launchers of the chosen kernel families; -> (distinct launches, rows for launchers that failed)."""
    families = {"attention": attention_cases, "moe": moe_cases, "align": align_cases, "glue": glue_cases}
    failed: list[Row] = []
    with capture(target) as recorder:
        for family, cases in families.items():
            if family not in kernels:
                continue
            for label, thunk in cases(plan):
                try:
                    recorder.run(label, thunk)
                except Exception as exc:  # the launcher itself refused: as loud as a compile error
                    failed.append(Row(f"<{family} launcher>", label, 0, 0,
                                      problems=[f"launcher error: {type(exc).__name__}: {exc}"]))
    return recorder.launches, failed


def print_table(rows: list[Row]) -> None:
    width = max([len("variant"), *(len(r.case) for r in rows)])
    head = (f"{'kernel':<16} {'variant':<{width}} {'w/s':>4} {'regs':>4} {'spill st/ld':>11} {'smem':>7} {'s':>5}"
            "  status")
    print(head)
    print("-" * len(head))
    for r in rows:
        spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        print(f"{r.kernel:<16} {r.case:<{width}} {r.num_warps}/{r.num_stages:<2} {_n(r.registers):>4} {spill:>11} "
              f"{_n(r.shared):>7} {r.seconds:>5.1f}  {'FAIL: ' + '; '.join(r.problems) if r.problems else 'ok'}")


def _n(x: int | None) -> str:
    return "-" if x is None else str(x)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--arch", type=int, default=90, help="compute capability as an int (H200: 90)")
    p.add_argument("--warp-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="a handful of variants (bf16, Dh 128, G 6, S 1 and 3)")
    p.add_argument("--kernels", default="attention,moe,align,glue", help="families to compile")
    p.add_argument("--dtypes", help="comma list of bf16,fp16,fp32")
    p.add_argument("--head-dims", type=_int_list)
    p.add_argument("--groups", type=_int_list, help="query heads per kv head")
    p.add_argument("--splits", type=_int_list, help="decode split counts (default: all the launcher can pick)")
    p.add_argument("--num-sms", type=int, help="SMs the split choice assumes (H200: 132)")
    p.add_argument("--moe-max-tokens", type=int)
    p.add_argument("--tuned-device", help="also compile the tuned MoE configs stored for this device name")
    p.add_argument("--fp8", help=f"comma list of FP8 expert modes ({','.join(FP8_MODES)}; empty: none)")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    base = QUICK if args.quick else Plan()
    overrides = {"dtypes": tuple(args.dtypes.split(",")) if args.dtypes else None, "head_dims": args.head_dims,
                 "groups": args.groups, "splits": args.splits, "num_sms": args.num_sms,
                 "moe_max_tokens": args.moe_max_tokens, "tuned_device": args.tuned_device,
                 "fp8": None if args.fp8 is None else tuple(m for m in args.fp8.split(",") if m),
                 "smem": SMEM_LIMIT.get(args.arch)}
    fields = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(fields.get("dtypes", ())) - set(DTYPE_CHOICES)
    if unknown:
        raise SystemExit(f"unknown dtypes {sorted(unknown)}: choose from {', '.join(DTYPE_CHOICES)}")
    if set(fields.get("fp8", ())) - set(FP8_MODES):
        raise SystemExit(f"unknown FP8 modes in {args.fp8!r}: choose from {', '.join(FP8_MODES)}")
    return Plan(**{**asdict(base), **fields})


def main(argv: list[str] | None = None) -> int:
    from triton.backends.compiler import GPUTarget

    args = parse_args(argv)
    plan = make_plan(args)
    target = GPUTarget(args.backend, args.arch, args.warp_size)
    kernels = set(args.kernels.split(","))
    start = time.perf_counter()
    launches, rows = collect(plan, target, kernels)
    print(f"Triton {triton.__version__}, target {args.backend} sm_{args.arch} (warp {args.warp_size}): "
          f"{len(launches)} distinct kernel variants from the launchers; decode splits {split_counts(plan)}",
          flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as pool:  # fork: no kernel is redefined
        for row in pool.map(compile_launch, launches, [target] * len(launches)):
            rows.append(row)
            if row.problems:
                print(f"FAIL {row.kernel} [{row.case}]: {'; '.join(row.problems)}", flush=True)
    print_table(rows)
    failed = [r for r in rows if r.problems]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed, {time.perf_counter() - start:.0f} s")
    if args.out:
        env = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
               "target": {"backend": args.backend, "arch": args.arch, "warp_size": args.warp_size}}
        args.out.write_text(json.dumps({"environment": env, "plan": asdict(plan), "decode_splits": split_counts(plan),
                                        "rows": [asdict(r) for r in rows]}, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
