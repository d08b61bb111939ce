"""The `moe-cluster` command line.

Each command imports what it needs when it runs, and only the chosen command's options are built: `keys list`
reads the ledger without importing torch or the serving stack."""

from __future__ import annotations

import argparse
import sys
import time
from types import UnionType
from typing import TYPE_CHECKING, Any, Callable, Literal, Union, get_args, get_origin

if TYPE_CHECKING:
    from cluster.serve.args import ServeArgs


def parse_size(text: str) -> int:
    """'2GB', '512MiB', '1000' -> bytes: pydantic's `ByteSize`, as the byte-size fields of a Serve config read them."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GB or 512MiB)") from None


def _make_checkpoint(args: argparse.Namespace) -> int:
    from cluster.checkpoint.presets import preset
    from cluster.checkpoint.writer import write_random_checkpoint

    t0 = time.perf_counter()
    out = write_random_checkpoint(args.directory, preset(args.preset), seed=args.seed, dtype=args.dtype,
                                  max_shard_bytes=args.shard_size)
    print(f"wrote the {args.preset} checkpoint (seed {args.seed}) to {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cluster.checkpoint.weights import model_directory
    from cluster.generate import greedy_generate
    from cluster.model.loader import load_model
    from cluster.tokenizer import IncrementalDetokenizer, load_tokenizer, resolve_tokenizer_version

    model_dir = model_directory(args.model, args.load_format)
    t0 = time.perf_counter()
    loaded = load_model(model_dir, dtype=args.dtype, backend=args.moe_backend, load_format=args.load_format,
                        quantization=args.quantization)
    tok = load_tokenizer(resolve_tokenizer_version(loaded.config, args.tokenizer))
    made = "made" if args.load_format == "random" else "loaded"
    print(f"{made} {model_dir} ({loaded.bytes_loaded / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    if args.raw:
        prompt = tok.encode(args.prompt, bos=True)
    else:
        prompt = tok.encode_chat([{"role": "user", "content": args.prompt}])
    detok = IncrementalDetokenizer(tok.decode)
    t0 = time.perf_counter()
    n = 0
    for token in greedy_generate(loaded.model, prompt, args.max_tokens, {tok.eos_id}):
        n += 1
        print(detok.add([token]), end="", flush=True)
    print(detok.flush())
    dt = time.perf_counter() - t0
    print(f"{len(prompt)} prompt tokens, {n} generated in {dt:.2f}s ({n / dt:.1f} tokens/s)", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from cluster.dtype import parse_dtype
    from cluster.config import ModelConfig, expert_quantization
    from cluster.parallel.placement import plan_placement

    config = ModelConfig.from_file(args.model)  # config.json only: no weights are read
    placement = plan_placement(config, args.gpus, args.gpu_memory, dtype_bytes=parse_dtype(args.dtype).itemsize,
                               num_shards=args.shards, gpu_memory_utilization=args.gpu_memory_utilization,
                               min_kv_tokens=args.min_kv_tokens,
                               quantization=expert_quantization(config, args.quantization),
                               attention_ranks=args.attention_ranks)
    print(placement.format())
    return 0


def serve_settings(args: argparse.Namespace) -> "ServeArgs":
    """The validated settings of a parsed `serve` command line (what the server it starts runs with)."""
    from cluster.serve.args import ServeArgs

    return ServeArgs(**{name: getattr(args, name) for name in ServeArgs.model_fields if hasattr(args, name)})


def _serve(args: argparse.Namespace) -> int:
    serve_args = serve_settings(args)
    if args.no_ray:
        from cluster.serve.resolved import resolve
        from cluster.serve.standalone import run_standalone

        run_standalone(resolve(serve_args), args.host, args.port)
    else:
        from cluster.serve.local_ray import run_on_ray

        run_on_ray(serve_args, args.host, args.port)
    return 0


def _keys(args: argparse.Namespace) -> int:
    import asyncio

    from cluster.ledger import LedgerError

    try:
        return asyncio.run(_keys_command(args))
    except LedgerError as e:
        print(f"moe-cluster keys {args.keys_command}: error: {e}", file=sys.stderr)
        return 2


async def _keys_command(args: argparse.Namespace) -> int:
    from cluster.ledger import format_dollars, open_ledger
    from cluster.ledger.sqlite_store import default_path

    def limit(n: int | None) -> str:
        return "-" if n is None else str(n)

    def when(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))

    ledger = open_ledger(args.db or str(default_path()))
    try:
        if args.keys_command == "create":
            record, key = await ledger.create_key(args.name, args.credits, args.rpm, args.tpm)
            print(f"created key {record.key_id} (name {record.name or '-'}, credits {format_dollars(args.credits)}, "
                  f"rpm {limit(args.rpm)}, tpm {limit(args.tpm)})")
            print(key)
            print("the key is shown only now: the ledger keeps its hash", file=sys.stderr)
        elif args.keys_command == "list":
            rows = [["KEY_ID", "NAME", "BALANCE", "RPM", "TPM", "STATUS", "CREATED"]]
            rows += [[k.key_id, k.name or "-", format_dollars(k.balance_micro), limit(k.rpm_limit),
                      limit(k.tpm_limit), "revoked" if k.revoked else "active", when(k.created)]
                     for k in await ledger.list_keys()]
            print(_table(rows))
        elif args.keys_command == "revoke":
            await ledger.revoke(args.key_id)
            print(f"revoked key {args.key_id}")
        elif args.keys_command == "credit":
            balance = await ledger.credit(args.key_id, args.dollars)
            print(f"key {args.key_id}: balance {format_dollars(balance)}")
        else:
            usage = await ledger.usage(args.key_id, args.limit)
            rows = [["REQUEST_ID", "KEY_ID", "PROMPT", "COMPLETION", "COST", "TIME"]]
            rows += [[u.request_id, u.key_id, str(u.prompt_tokens), str(u.completion_tokens),
                      format_dollars(u.cost_micro), when(u.time)] for u in usage]
            print(_table(rows))
            print(f"{len(usage)} requests, {format_dollars(sum(u.cost_micro for u in usage))} in all")
    finally:
        await ledger.close()
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _dollars(text: str) -> int:
    from cluster.ledger import parse_dollars

    try:
        return parse_dollars(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _keys_options(keys: argparse.ArgumentParser) -> None:
    actions = keys.add_subparsers(dest="keys_command", required=True)
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="URL", help="sqlite:///path.db, a path, or postgresql://user@host:port/db "
                    "(password: in the URL or $MOE_CLUSTER_DB_PASSWORD; default: ledger.db in the user's cache)")
    p = actions.add_parser("create", parents=[db], help="create a key; prints it once")
    p.add_argument("--credits", type=_dollars, default=0, metavar="DOLLARS", help="starting credits (default 0)")
    p.add_argument("--name")
    p.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    p.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    actions.add_parser("list", parents=[db], help="every key with its balance")
    p = actions.add_parser("revoke", parents=[db], help="refuse a key from now on")
    p.add_argument("key_id")
    p = actions.add_parser("credit", parents=[db], help="add credits to a key")
    p.add_argument("key_id")
    p.add_argument("dollars", type=_dollars)
    p = actions.add_parser("usage", parents=[db], help="the usage log, newest first")
    p.add_argument("key_id", nargs="?", help="one key's requests only")
    p.add_argument("--limit", type=int, default=100, help="rows to show (default 100)")
    keys.set_defaults(run=_keys)


def add_model_options(parser: argparse.ArgumentParser, model: type) -> None:
    """One option per field of the pydantic `model`, named, typed and described by the field. Options left out
    are not set, so the model's own defaults apply (they have one owner)."""
    from pydantic import ByteSize

    for name, field in model.model_fields.items():
        kind, choices = _option_type(field.annotation)
        default = field.get_default(call_default_factory=True)
        described = (field.description or "").replace("%", "%%")
        shown = "" if default is None or "default" in described else f" (default: {default})"
        option = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=described + shown)
            continue
        size = kind is ByteSize
        parser.add_argument(option, type=parse_size if size else kind, choices=choices, default=argparse.SUPPRESS,
                            help=described + shown, metavar="SIZE" if size else None)


def _option_type(annotation: Any) -> tuple[Any, list | None]:
    """(argparse type, choices) of a field annotation such as `int | None` or `Literal["a", "b"]`."""
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) \
        else [annotation]
    inner = args[0]
    if get_origin(inner) is Literal:
        return str, list(get_args(inner))
    return inner, None


def _make_checkpoint_options(p: argparse.ArgumentParser) -> None:
    from cluster.dtype import DTYPE_CHOICES

    p.add_argument("directory")
    p.add_argument("--preset", choices=["tiny", "mini"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"),
                   help="largest safetensors file; bigger checkpoints are sharded with an index (default 2GB)")
    p.set_defaults(run=_make_checkpoint)


def _generate_options(p: argparse.ArgumentParser) -> None:
    from cluster.dtype import DTYPE_CHOICES

    p.add_argument("--model", help="checkpoint directory, or with --load-format random a shape's name (default: the "
                                    "embedded mini checkpoint)")
    p.add_argument("--load-format", choices=["safetensors", "random"], default="safetensors",
                   help="random: seeded weights made in memory, no checkpoint read (the text is noise)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["auto", *DTYPE_CHOICES], default="fp32")
    p.add_argument("--tokenizer", choices=["v1", "v2", "v3"], help="default: from the checkpoint")
    p.add_argument("--moe-backend", choices=["auto", "cpu", "torch", "triton"], default="auto")
    _quantization_option(p)
    p.add_argument("--raw", action="store_true", help="encode the prompt as plain text, without the chat template")
    p.set_defaults(run=_generate)


def _plan_options(p: argparse.ArgumentParser) -> None:
    from cluster.dtype import DTYPE_CHOICES

    p.add_argument("--model", required=True, help="checkpoint directory or config.json (no weights needed)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs for one serving unit (0: CPU shards, with --shards)")
    p.add_argument("--gpu-memory", type=parse_size, default=parse_size("80GiB"), help="per GPU (default 80GiB)")
    p.add_argument("--shards", type=int, help="expert shards (default: min(GPUs, experts))")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16")
    _quantization_option(p)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--min-kv-tokens", type=int, help="KV-cache tokens the replica's GPU must hold (default: context)")
    p.add_argument("--attention-ranks", type=int, default=1,
                   help="data-parallel attention: one rank per GPU, each with its own KV cache and one shard of the "
                        "experts (as `serve --attention-ranks`; 1: one replica attends)")
    p.set_defaults(run=_plan)


def _quantization_option(p: argparse.ArgumentParser) -> None:
    """`--quantization`, as `serve` has it (ServeArgs.quantization, whose pydantic these commands do not import)."""
    from cluster.config import QUANTIZATIONS

    p.add_argument("--quantization", choices=QUANTIZATIONS, help="fp8: the experts in FP8, a scale per output "
                   "channel (quantized at load from a bf16/fp32 checkpoint); default: the checkpoint's own")


def _serve_options(p: argparse.ArgumentParser) -> None:
    from cluster.serve.args import ServeArgs

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--no-ray", action="store_true", help="one process, same API: experts run in this process")
    add_model_options(p, ServeArgs)
    p.set_defaults(run=_serve)


# name -> (help, what adds its options and its `run`)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "make-checkpoint": ("write a random Mixtral-shaped checkpoint in the HF layout", _make_checkpoint_options),
    "generate": ("greedy generation for one prompt, straight on the model", _generate_options),
    "plan": ("plan expert shards and memory per GPU from config.json; refuse what does not fit", _plan_options),
    "serve": ("serve the OpenAI chat-completions API (Ray Serve, or one process)", _serve_options),
    "keys": ("API keys and their credits: create, list, revoke, credit, usage", _keys_options),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every command is listed, only the one `argv` names gets its options (each command's
    options import what they describe, e.g. `serve`'s the settings model)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="moe-cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_options) in _COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text)
        if name == chosen:
            add_options(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.logs import configure_logging

    args = build_parser(argv).parse_args(argv)
    configure_logging()
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"moe-cluster {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
