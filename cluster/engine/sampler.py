"""The batched sampler: logit bias, allowed-token masks, tokens that may not end the output yet (min_tokens),
penalties, temperature, top-k/top-p/min-p and seeded draws.

Randomness is drawn on the logits' device. Unseeded rows share one batched draw from the sampler's own generator
(seeded from the OS); a seeded row draws from its own generator, one fixed-size draw per step, so a seeded request
gets the same tokens whatever else shares its batch. Per-step parameters reach the device through pinned,
non-blocking copies. `sample` leaves the chosen tokens (and their logprobs) on the device, on their way to pinned
host memory; `DeviceSample.result` is the step's one sync, and the next step may be launched before it (reading the
tokens on the device).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
import torch

from cluster.engine.outputs import TokenLogprobs
from cluster.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One sequence's view for this step."""

    params: SamplingParams
    output_token_ids: list[int]  # generated so far; the penalties count these
    generator: torch.Generator | None  # the request's own, seeded from params.seed; None: greedy or unseeded
    # The tokens its grammar allows (structured output), packed: int32 [ceil(V / 32)], bit t % 32 of word t // 32
    # allows token t. None: no restriction.
    allowed: torch.Tensor | None = None
    # Tokens that would end the output (EOS, stop_token_ids) while it is shorter than params.min_tokens: masked,
    # unless the grammar allows nothing else (a grammar's end wins over min_tokens).
    banned: tuple[int, ...] = ()


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is off


class DeviceSample:
    """A step's draws: `tokens` [B] int64 on the device (what a step launched after it reads), and their copies on
    their way to the host, read by `result` (which waits for them, and only for them)."""

    def __init__(self, tokens: torch.Tensor, rows: list[SamplingRow], logprobs: _DeviceLogprobs | None):
        self.tokens = tokens
        self._tops = [r.params.top_logprobs if r.params.logprobs else None for r in rows]
        self._want = [i for i, n in enumerate(self._tops) if n is not None]
        parts = (tokens,) + (logprobs if logprobs is not None else ())
        cuda = tokens.device.type == "cuda"
        self._host = tuple(_to_pinned(t) for t in parts) if cuda else parts
        self._ready = torch.cuda.Event() if cuda else None
        if self._ready is not None:
            self._ready.record()

    def result(self) -> SamplerOutput:
        if self._ready is not None:
            self._ready.synchronize()
        token_ids, *rest = (t.tolist() for t in self._host)
        logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
        if rest:
            chosen, top_values, top_ids = rest
            for j, i in enumerate(self._want):
                n = self._tops[i]
                logprobs[i] = TokenLogprobs(chosen[j], list(zip(top_ids[j][:n], top_values[j][:n])))
        return SamplerOutput(token_ids, logprobs)


_DeviceLogprobs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # chosen [W], top values [W, k], top ids [W, k]


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """A non-blocking copy of device tensor `t` into pinned host memory (valid once the stream has reached it)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed`, or with a random seed from the OS when it is None."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    return gen


class Sampler:
    """Picks one token per row of [B, V] logits.

    Order, with OpenAI / vLLM semantics: logit_bias -> allowed-token mask -> banned tokens (min_tokens) ->
    frequency and presence penalties over the row's output tokens -> greedy argmax when `params.greedy` (temperature
    ~0), else temperature -> top_k -> top_p -> min_p -> a draw from the renormalised distribution with the row's own
    generator.

    Logprobs are those of the model's raw distribution (log_softmax of the logits as given, before the mask,
    penalties and temperature), as vLLM reports them by default.
    """

    def __init__(self) -> None:
        self._shared: dict[torch.device, torch.Generator] = {}  # the unseeded rows' generator, per device

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        return self.sample(logits, rows).result()

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> DeviceSample:
        """Draw one token per row, on the device, without waiting for the draws."""
        _check(logits, rows)
        processed = _mask_and_penalise(logits, rows)  # [B, V]
        tokens = processed.argmax(dim=-1)  # [B]; greedy rows keep this
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            idx = _on_device(sampled, torch.long, logits.device)
            probs = _sampling_probs(processed[idx], [rows[i].params for i in sampled])  # [S, V]
            noise = self._exponential_noise([rows[i].generator for i in sampled], logits.shape[-1], logits.device)
            # argmax(p / E) with E ~ Exp(1) i.i.d. picks token t with probability p[t].
            tokens[idx] = (probs / noise).argmax(dim=-1)
        return DeviceSample(tokens, rows, _logprobs(logits, rows, tokens))

    def _exponential_noise(self, gens: list[torch.Generator | None], V: int, device: torch.device) -> torch.Tensor:
        """[S, V] Exp(1) draws on `device`: one batched draw for the rows without a generator of their own, and one
        draw of V values from each row's own generator (on that generator's device)."""
        noise = torch.empty(len(gens), V, device=device)
        shared = [j for j, g in enumerate(gens) if g is None]
        if len(shared) == len(gens):
            noise.exponential_(generator=self._shared_generator(device))
        elif shared:
            draw = torch.empty(len(shared), V, device=device).exponential_(generator=self._shared_generator(device))
            noise[_on_device(shared, torch.long, device)] = draw
        for j, g in enumerate(gens):
            if g is not None:
                noise[j] = torch.empty(V, device=g.device).exponential_(generator=g).to(device, non_blocking=True)
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            self._shared[device] = make_generator(None, device)
        return self._shared[device]

    def probabilities(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The [B, V] distribution each row samples from this step (one-hot at the argmax for greedy rows)."""
        _check(logits, rows)
        processed = _mask_and_penalise(logits, rows)
        out = torch.zeros_like(processed).scatter_(-1, processed.argmax(dim=-1, keepdim=True), 1.0)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            idx = _on_device(sampled, torch.long, logits.device)
            out[idx] = _sampling_probs(processed[idx], [rows[i].params for i in sampled])
        return out


def _check(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [B, V] with B = {len(rows)} rows, got {tuple(logits.shape)}")


def _on_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device`: through pinned memory and a non-blocking copy on CUDA (no host sync)."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _mask_and_penalise(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Logit bias, allowed-token masks, banned tokens, then frequency/presence penalties; the logits given are left
    untouched."""
    out = logits.float().clone()  # [B, V]
    B, V = out.shape
    device = out.device

    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if biased:
        entries = [(i, t, b) for i in biased for t, b in rows[i].params.logit_bias]
        at = (_on_device([e[0] for e in entries], torch.long, device), _on_device([e[1] for e in entries], torch.long,
                                                                                  device))
        out.index_put_(at, _on_device([e[2] for e in entries], torch.float32, device), accumulate=True)

    masked = [i for i, r in enumerate(rows) if r.allowed is not None]
    if masked:
        idx = _on_device(masked, torch.long, device)
        words = torch.stack([rows[i].allowed for i in masked])  # [M, W], on the host: checked without a device sync
        if bool((words == 0).all(dim=-1).any()):
            raise ValueError("an allowed-token mask allows no token at all")
        allowed = unpack_bitmask(words.to(device, non_blocking=True), V)
        out[idx] = out[idx].masked_fill(~allowed, _NEG_INF)

    banning = [i for i, r in enumerate(rows) if r.banned]
    if banning:
        _ban(out, rows, banning)

    pen = [i for i, r in enumerate(rows) if (r.params.frequency_penalty or r.params.presence_penalty)
           and r.output_token_ids]
    if pen:
        longest = max(len(rows[i].output_token_ids) for i in pen)
        # Padded with V, an extra bucket that is dropped after counting.
        padded = _on_device([rows[i].output_token_ids + [V] * (longest - len(rows[i].output_token_ids))
                             for i in pen], torch.long, device)  # [P, L]
        counts = torch.zeros(len(pen), V + 1, device=device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
        counts = counts[:, :V]  # [P, V]
        freq = _on_device([rows[i].params.frequency_penalty for i in pen], torch.float32, device)[:, None]  # [P, 1]
        pres = _on_device([rows[i].params.presence_penalty for i in pen], torch.float32, device)[:, None]
        idx = _on_device(pen, torch.long, device)
        out[idx] = out[idx] - freq * counts - pres * (counts > 0).float()
    return out


def _ban(out: torch.Tensor, rows: list[SamplingRow], banning: list[int]) -> None:
    """-inf at the banned tokens of rows `banning` of `out` [B, V], in place; a row left with no finite logit (only
    its grammar can do that: it allows banned tokens alone) keeps its logits. Decided on the device: no sync."""
    device = out.device
    at = (_on_device([i for i in banning for _ in rows[i].banned], torch.long, device),
          _on_device([t for i in banning for t in rows[i].banned], torch.long, device))
    guarded = [i for i in banning if rows[i].allowed is not None]
    if guarded:
        idx = _on_device(guarded, torch.long, device)
        kept = out[idx]  # [G, V], a copy
    out.index_put_(at, out.new_full(at[1].shape, _NEG_INF))
    if guarded:
        banned = out[idx]
        out[idx] = torch.where((banned == _NEG_INF).all(dim=-1, keepdim=True), kept, banned)


def unpack_bitmask(words: torch.Tensor, V: int) -> torch.Tensor:
    """Packed int32 masks [M, W] -> bool [M, V] (bit t % 32 of word t // 32 is token t)."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)  # [32]
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [M, W, 32]; arithmetic shifts: bit 31 reads right too
    return bits.reshape(words.shape[0], -1)[:, :V].bool()


def _sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p on [S, V] masked and penalised logits of sampled rows; [S, V] probs."""
    S, V = logits.shape
    device = logits.device
    temperature = _on_device([p.temperature for p in params], torch.float32, device)[:, None]  # [S, 1]
    logits = logits / temperature

    trunc = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    if trunc:
        idx = _on_device(trunc, torch.long, device)
        top_k = _on_device([min(params[i].top_k, V) or V for i in trunc], torch.long, device)
        # top_p == 1 never cuts: rounding in the cumulative sum must not drop the tail.
        top_p = _on_device([params[i].top_p if params[i].top_p < 1 else 2.0 for i in trunc], torch.float32, device)
        logits[idx] = _top_k_top_p(logits[idx], top_k, top_p)

    probs = logits.softmax(dim=-1)  # [S, V]
    if any(p.min_p > 0 for p in params):  # decided on the host: no sync
        min_p = _on_device([p.min_p for p in params], torch.float32, device)[:, None]  # [S, 1]
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k logits, then the smallest most likely set of those (renormalised) whose probability
    reaches top_p; the rest become -inf. logits [N, V], top_k [N] in 1..V, top_p [N]."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [N, V]
    rank = torch.arange(logits.shape[-1], device=logits.device)  # [V]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], _NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above; 0 for the top token
    sorted_logits = sorted_logits.masked_fill(above >= top_p[:, None], _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter(-1, order, sorted_logits)


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor) -> _DeviceLogprobs | None:
    """The chosen tokens' raw logprobs and each row's top ones, on the device, for the rows that want them (None:
    no row does)."""
    want = [i for i, r in enumerate(rows) if r.params.logprobs]
    if not want:
        return None
    idx = _on_device(want, torch.long, logits.device)
    raw = logits[idx].float().log_softmax(dim=-1)  # [W, V]
    chosen = raw.gather(1, tokens[idx][:, None])[:, 0]  # [W]
    k = max(rows[i].params.top_logprobs for i in want)
    top_values, top_ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())  # [W, k]
    return chosen, top_values, top_ids
