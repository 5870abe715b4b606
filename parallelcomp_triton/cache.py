"""KV caches at KV-head granularity: a chunk's full K/V, per-chunk compressed caches, and the merged cache
decoding runs on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkKV:
    """One chunk's full K/V for every layer, keys[l] / values[l] [H_kv, n, d], and the final (normed) hidden
    state of its last token [hidden], which the question's first token is predicted from."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class ChunkCache:
    """One chunk's compressed KV for every layer: keys[l], values[l] are [H_kv, n, d] with the same n in
    every layer and head (n = min(budget, context length)). `positions[l]` [H_kv, n] are the kept
    chunk-local context positions (None when nothing was evicted)."""

    index: int
    context_len: int
    nll: float = float("nan")
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] | None = None
    # Until `score.compress` runs: (the chunk's full ChunkKV, its window scores per layer [n, H_kv]). KV
    # selection waits for chunk eviction, so a chunk evicted in its own batch is never compressed.
    pending: tuple | None = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def release_kv(self) -> None:
        """Drop the K/V tensors once they are copied into a merged cache (index, nll, positions stay)."""
        self.keys, self.values = [], []


class CompressedKVCache:
    """The merged caches of B sequences: per row the shared prompt prefix once, the kept chunks' compressed
    KV in document order, then the question and the generated tokens. Per layer [B, H_kv, capacity, d]
    with an optional per query head mask [B, H, capacity] (True = excluded) that calibration fills.
    Every row has its own valid length (`lengths[b]`); positions past it hold zeros."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, num_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, capacity, head_dim)
        # zeros, not empty: the torch decode path multiplies masked-out positions by 0, and 0 * NaN is NaN.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_mask: list[torch.Tensor | None] = [None] * num_layers
        self.num_heads = num_heads
        self.capacity = capacity
        self.lengths = [0] * batch  # valid positions per row (the same for every layer)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def fill_row(self, row: int, prefix_keys: list[torch.Tensor] | None, prefix_values: list[torch.Tensor] | None,
                 chunks: list[ChunkCache]) -> int:
        """Write prefix + chunks (document order) at the start of `row`; returns the merged length."""
        prefix_len = prefix_keys[0].shape[1] if prefix_keys else 0
        merged = prefix_len + sum(c.length for c in chunks)
        if merged > self.capacity:
            raise RuntimeError(f"KV cache overflow: merged length {merged} > capacity {self.capacity}")
        for layer in range(len(self.keys)):
            parts_k = ([prefix_keys[layer]] if prefix_len else []) + [c.keys[layer] for c in chunks]
            parts_v = ([prefix_values[layer]] if prefix_len else []) + [c.values[layer] for c in chunks]
            torch.cat(parts_k, dim=1, out=self.keys[layer][row, :, :merged])
            torch.cat(parts_v, dim=1, out=self.values[layer][row, :, :merged])
        self.lengths[row] = merged
        return merged

    def append(self, layer: int, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [n, H_kv, d] of `row` at positions start..start+n-1."""
        n = k.shape[0]
        if start + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {start + n} > capacity {self.capacity}")
        self.keys[layer][row, :, start:start + n] = k.transpose(0, 1)
        self.values[layer][row, :, start:start + n] = v.transpose(0, 1)

    def append_tokens(self, layer: int, rows: torch.Tensor, at: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """Decoding: one token per row, k, v [B, H_kv, d] written at position at[b] (device int64 [B]) of
        row rows[b]; no host sync. The caller checks capacity (it knows the lengths on the host)."""
        self.keys[layer][rows, :, at] = k
        self.values[layer][rows, :, at] = v

    def packed_view(self, layer: int, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`row`'s first `length` positions as [length, H_kv, d] strided views (no copy)."""
        return (self.keys[layer][row, :, :length].transpose(0, 1),
                self.values[layer][row, :, :length].transpose(0, 1))

    def set_key_mask(self, layer: int, row: int, mask: torch.Tensor) -> None:
        """mask [n, H] (True = excluded) for the first n positions of `row`."""
        if self.key_mask[layer] is None:
            b = self.keys[layer].shape[0]
            self.key_mask[layer] = torch.zeros(b, self.num_heads, self.capacity, dtype=torch.bool,
                                               device=mask.device)
        self.key_mask[layer][row, :, :mask.shape[0]] = mask.transpose(0, 1)

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only `rows` (ascending), moved to the front in that order: finished sequences leave the
        batch. In place: each layer's tensors become views of their first len(rows) rows, so nothing is
        reallocated; the move costs one copy of the moved rows, about one decode step's K/V reads."""
        first = next((i for i, r in enumerate(rows) if r != i), len(rows))
        n = len(rows)
        if first < n:
            index = torch.tensor(rows[first:], dtype=torch.long, device=self.keys[0].device)
        for layer in range(len(self.keys)):
            for store in (self.keys, self.values, self.key_mask):
                t = store[layer]
                if t is None:
                    continue
                if first < n:
                    t[first:n] = t.index_select(0, index)
                store[layer] = t[:n]
        self.lengths = [self.lengths[r] for r in rows]

    def nbytes(self, row: int | None = None) -> int:
        """Bytes of the valid KV entries of `row` (default: all rows)."""
        _, h_kv, _, d = self.keys[0].shape
        tokens = sum(self.lengths) if row is None else self.lengths[row]
        return 2 * len(self.keys) * h_kv * tokens * d * self.keys[0].element_size()
