"""The torch backend: gathers of each step's blocks into a bounded workspace, then matmuls or SDPA.

Decodes are attended in up to `decode_groups` groups of neighbouring lengths (the runner sorts decodes shortest
first), each gathered and padded only to its own longest context: one group padded to the batch's longest wastes
about half the gathers and matmuls when lengths spread from 32 to 768 tokens. Prefill chunks are attended one by one
with SDPA (each is many tokens, so the loop costs little).

The gathers land in a workspace kept across steps (a fresh tensor of this size costs more in page faults than the
copy itself on CPU) and capped at `workspace_bytes`, so it never grows into memory the KV cache was meant to leave
free: a decode group too wide for it is attended a few rows at a time, and a context too long for even one row is
attended in column chunks merged by online softmax (`_attend_long`).

Legend: T = new tokens, B = sequences, H = query heads, KV = kv heads, G = H / KV, Dh = head dim, N = blocks,
bs = block size, b = rows of a group, W = its padded width (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.attention.metadata import AttentionMetadata
from cluster.model.kv_cache import causal_attention

DEFAULT_WORKSPACE_BYTES = 64 << 20


class GatherWorkspace:
    """Two reused buffers (keys, values), each at most `limit_bytes // 2`."""

    def __init__(self, limit_bytes: int, dtype: torch.dtype, device: torch.device):
        self.half_bytes = limit_bytes // 2
        self.itemsize = dtype.itemsize
        self._buffers = {name: torch.empty(0, dtype=dtype, device=device) for name in ("k", "v")}

    def gather(self, name: str, cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """cache [KV, N, bs, Dh], tables [b, nb] -> [KV, b, nb*bs, Dh] in the workspace (it must fit)."""
        kv_heads, _, bs, head_dim = cache.shape
        b, nb = tables.shape
        need = kv_heads * b * nb * bs * head_dim
        if need * self.itemsize > self.half_bytes:
            raise ValueError(f"a gather of {need * self.itemsize} bytes exceeds the workspace's {self.half_bytes}")
        if self._buffers[name].numel() < need:
            self._buffers[name] = torch.empty(need, dtype=cache.dtype, device=cache.device)
        work = self._buffers[name][:need].view(kv_heads, b * nb, bs, head_dim)
        flat = tables.flatten()
        for h in range(kv_heads):
            torch.index_select(cache[h], 0, flat, out=work[h])
        return work.view(kv_heads, b, nb * bs, head_dim)


@dataclass(frozen=True)
class DecodeGroup:
    """Decoding sequences attended together."""

    rows: slice  # the group's sequences in the flat batch
    blocks: int  # its padded width in blocks
    bias: torch.Tensor | None  # [1, b, 1, W] fp32: 0 inside each context, -inf past it; None: one row at a time
    has_empty: bool  # a row of context 0 (padding), whose softmax over nothing must become zeros


class TorchAttentionBackend:
    name = "torch"
    graph_safe = False
    decode_groups = 4
    min_group = 16  # fewer sequences than this in a group and the extra calls cost more than the padding saved

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, scale: float, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES):
        self.block_size = block_size
        self.scale = scale
        self.workspace = GatherWorkspace(workspace_bytes, dtype, torch.device(device))
        # bytes of one gathered block of keys (or values) over all kv heads
        self.block_bytes = num_kv_heads * block_size * head_dim * dtype.itemsize
        if self.block_bytes > self.workspace.half_bytes:
            raise ValueError(f"a workspace of {workspace_bytes} bytes cannot hold two blocks of {self.block_bytes}")
        self.groups: list[DecodeGroup] = []

    # -- planning ----------------------------------------------------------------------------------------------
    def plan(self, meta: AttentionMetadata) -> None:
        nd = meta.num_decodes
        parts = max(1, min(self.decode_groups, nd // self.min_group))
        bounds = [nd * i // parts for i in range(parts + 1)] if nd else []
        self.groups = []
        for start, end in zip(bounds, bounds[1:]):
            blocks = -(-max(meta.context_lens[start:end]) // self.block_size)
            per_row = max(1, blocks) * self.block_bytes
            if per_row > self.workspace.half_bytes:  # even one row is too long: column chunks, row by row
                self.groups.append(DecodeGroup(slice(start, end), blocks, None, False))
                continue
            step = self.workspace.half_bytes // per_row  # rows whose gather fits
            for a in range(start, end, step):
                self.groups.append(self._group(meta, a, min(end, a + step)))

    def _group(self, meta: AttentionMetadata, start: int, end: int) -> DecodeGroup:
        lens = meta.context_lens[start:end]
        blocks = -(-max(lens) // self.block_size)
        width = blocks * self.block_size
        device = meta.block_tables.device
        past = torch.arange(width, device=device)[None, :] >= meta.seq_lens[start:end, None]  # [b, W]
        bias = torch.zeros(past.shape, dtype=torch.float32, device=device).masked_fill_(past, float("-inf"))
        return DecodeGroup(slice(start, end), blocks, bias[None, :, None, :], min(lens) == 0)

    # -- attending ---------------------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        self.decode(q, k_cache, v_cache, meta, out)
        self.prefill(q, k_cache, v_cache, meta, out)
        return out

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
               out: torch.Tensor) -> None:
        """out[:num_decodes] <- one new token per sequence, group by group (as planned)."""
        for group in self.groups:
            if group.bias is not None:
                out[group.rows] = self._decode(q[group.rows], k_cache, v_cache, meta, group)
                continue
            for i in range(group.rows.start, group.rows.stop):
                total = meta.context_lens[i]
                if total == 0:
                    out[i].zero_()
                else:
                    table = meta.block_tables[i, :-(-total // self.block_size)]
                    out[i:i + 1] = self._attend_long(q[i:i + 1], k_cache, v_cache, table, total, total - 1)

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                out: torch.Tensor) -> None:
        """out rows of the prefill chunks (after the decodes) <- causal attention, one sequence at a time."""
        offset = meta.num_decodes
        for i in range(meta.num_decodes, meta.num_seqs):
            n, total = meta.query_lens[i], meta.context_lens[i]
            blocks = -(-total // self.block_size)
            table = meta.block_tables[i, :blocks]
            rows = slice(offset, offset + n)
            if blocks * self.block_bytes <= self.workspace.half_bytes:
                keys = self.workspace.gather("k", k_cache, table[None])[:, 0, :total].transpose(0, 1)  # [total, KV, Dh]
                values = self.workspace.gather("v", v_cache, table[None])[:, 0, :total].transpose(0, 1)
                out[rows] = causal_attention(q[rows], keys, values, total - n)
            else:
                out[rows] = self._attend_long(q[rows], k_cache, v_cache, table, total, total - n)
            offset += n

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                group: DecodeGroup) -> torch.Tensor:
        """q [b, H, Dh] -> [b, H, Dh]."""
        b, heads, head_dim = q.shape
        kv_heads = k_cache.shape[0]
        tables = meta.block_tables[group.rows, :group.blocks]
        keys = self.workspace.gather("k", k_cache, tables)  # [KV, b, W, Dh]
        values = self.workspace.gather("v", v_cache, tables)
        qg = q.view(b, kv_heads, heads // kv_heads, head_dim).transpose(0, 1)  # [KV, b, G, Dh]
        scores = torch.matmul(qg, keys.transpose(2, 3)).float()  # [KV, b, G, W]
        probs = scores.mul_(self.scale).add_(group.bias).softmax(-1)
        if group.has_empty:
            probs.nan_to_num_(0.0)  # softmax over no keys
        return torch.matmul(probs.to(q.dtype), values).transpose(0, 1).reshape(b, heads, head_dim)

    def _attend_long(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     total: int, start: int) -> torch.Tensor:
        """q [n, H, Dh] at positions start..start+n-1 over one sequence's `total` cached tokens -> [n, H, Dh], in
        column chunks whose gathers (and fp32 scores) fit the workspace, merged by online softmax."""
        n, heads, head_dim = q.shape
        kv_heads = k_cache.shape[0]
        group = heads // kv_heads
        bs = self.block_size
        chunk_blocks = self.workspace.half_bytes // self.block_bytes
        cols = chunk_blocks * bs
        q_rows = max(1, self.workspace.half_bytes // (4 * heads * cols))  # query tokens per pass
        blocks = -(-total // bs)
        out = torch.empty_like(q)
        for r0 in range(0, n, q_rows):
            qc = q[r0:r0 + q_rows]
            m = qc.shape[0]
            qg = qc.reshape(m, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(kv_heads, group * m, head_dim)
            pos = torch.arange(start + r0, start + r0 + m, device=q.device).repeat(group)  # [G*m], rows (g, i)
            best = torch.full((kv_heads, group * m), float("-inf"), device=q.device)
            norm = torch.zeros(kv_heads, group * m, device=q.device)
            acc = torch.zeros(kv_heads, group * m, head_dim, device=q.device)
            for c0 in range(0, blocks, chunk_blocks):
                part = table[c0:c0 + chunk_blocks][None]
                keys = self.workspace.gather("k", k_cache, part)[:, 0]  # [KV, w, Dh]
                values = self.workspace.gather("v", v_cache, part)[:, 0]
                scores = torch.matmul(qg, keys.transpose(1, 2)).float().mul_(self.scale)  # [KV, G*m, w]
                key_pos = torch.arange(c0 * bs, c0 * bs + keys.shape[1], device=q.device)
                scores.masked_fill_(key_pos[None, :] > pos[:, None], float("-inf"))  # causal; also past `total`
                new = torch.maximum(best, scores.amax(-1))  # finite: key 0 is in the first chunk for every row
                alpha = torch.exp(best - new)
                probs = torch.exp(scores - new[..., None])
                norm = norm * alpha + probs.sum(-1)
                acc = acc * alpha[..., None] + torch.matmul(probs.to(values.dtype), values).float()
                best = new
            res = (acc / norm[..., None]).to(q.dtype).view(kv_heads, group, m, head_dim)
            out[r0:r0 + m] = res.permute(2, 0, 1, 3).reshape(m, heads, head_dim)
        return out
