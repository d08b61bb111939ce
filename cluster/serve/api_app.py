"""The HTTP app a server process serves, from its resolved settings: the same in the single process and in every
Ingress replica."""

from __future__ import annotations

import logging

from cluster.api.accounts import Accounts
from cluster.api.backend import GenerationBackend
from cluster.api.server import build_api, system_fingerprint
from cluster.dtype import dtype_name
from cluster.serve.drain import Drain
from cluster.serve.resolved import ResolvedArgs
from cluster.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def served_api(resolved: ResolvedArgs, backend: GenerationBackend) -> Drain:
    """The OpenAI API over `backend`, drainable. The process opens the ledger itself, in its own event loop (at the
    app's start-up); the password comes from this process's environment (a k8s Secret), never from `resolved`."""
    r, args = resolved, resolved.args
    if args.db is None:
        log.warning("no --db: the API is open, without keys or credits")
    api = build_api(backend, load_tokenizer(r.tokenizer_version), r.model_name, r.config.max_position_embeddings,
                    r.sampling, r.api, system_fingerprint(r.model_name, dtype_name(r.dtype)),
                    Accounts.open(args.db, args.pricing, args.reservation_ttl_s))
    return Drain(api)


def reconfigure_api(drain: Drain, resolved: ResolvedArgs) -> None:
    """Apply `resolved`'s live settings (cluster.serve.live: limits, prices) to the running app `served_api` made."""
    drain.app.state.reconfigure(resolved.api, resolved.args.pricing)
