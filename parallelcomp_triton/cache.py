"""KV caches at KV-head granularity: per-chunk compressed caches and the merged cache decoding runs on."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class CompressedKVCache:
    """The merged cache: the shared prompt prefix once, the kept chunks' compressed KV in document order,
    then the question and the generated tokens. Per layer [B, H_kv, capacity, d] with an optional per
    query head mask [B, H, capacity] (True = excluded) that calibration fills."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, num_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.key_mask: list[torch.Tensor | None] = [None] * num_layers
        self.num_heads = num_heads
        self.capacity = capacity
        self.length = 0  # valid positions (the same for every layer)

    @classmethod
    def merge(cls, prefix_keys: list[torch.Tensor] | None, prefix_values: list[torch.Tensor] | None,
              chunks: list[ChunkCache], num_heads: int, extra: int) -> "CompressedKVCache":
        """Concatenate prefix + chunks (already in document order), leaving `extra` free positions."""
        ref = chunks[0].keys[0]
        num_layers, (h_kv, _, d) = len(chunks[0].keys), ref.shape
        prefix_len = prefix_keys[0].shape[1] if prefix_keys else 0
        merged = prefix_len + sum(c.length for c in chunks)
        cache = cls(num_layers, 1, h_kv, num_heads, d, merged + extra, ref.dtype, ref.device)
        for layer in range(num_layers):
            parts_k = ([prefix_keys[layer]] if prefix_len else []) + [c.keys[layer] for c in chunks]
            parts_v = ([prefix_values[layer]] if prefix_len else []) + [c.values[layer] for c in chunks]
            torch.cat(parts_k, dim=1, out=cache.keys[layer][0, :, :merged])
            torch.cat(parts_v, dim=1, out=cache.values[layer][0, :, :merged])
        cache.length = merged
        return cache

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [n, H_kv, d] of batch row 0 at positions start..start+n-1."""
        n = k.shape[0]
        if start + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {start + n} > capacity {self.capacity}")
        self.keys[layer][0, :, start:start + n] = k.transpose(0, 1)
        self.values[layer][0, :, start:start + n] = v.transpose(0, 1)

    def packed_view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row 0's first `length` positions as [length, H_kv, d] strided views (no copy)."""
        return (self.keys[layer][0, :, :length].transpose(0, 1),
                self.values[layer][0, :, :length].transpose(0, 1))

    def set_key_mask(self, layer: int, mask: torch.Tensor) -> None:
        """mask [n, H] (True = excluded) for the first n positions of row 0."""
        if self.key_mask[layer] is None:
            b = self.keys[layer].shape[0]
            self.key_mask[layer] = torch.zeros(b, self.num_heads, self.capacity, dtype=torch.bool,
                                               device=mask.device)
        self.key_mask[layer][0, :, :mask.shape[0]] = mask.transpose(0, 1)

    def nbytes(self, length: int | None = None) -> int:
        """Bytes of the KV entries up to `length` (default: the valid length)."""
        length = self.length if length is None else length
        b, h_kv, _, d = self.keys[0].shape
        return 2 * len(self.keys) * b * h_kv * length * d * self.keys[0].element_size()
