"""KV cache of one sequence: per layer K [capacity, Hkv, D] and V [capacity, Hkv, Dv], grown by
doubling up to the context size so a short chat does not allocate the whole context."""

from __future__ import annotations

import torch

from kiln.config import ModelConfig
from kiln.errors import UsageError
from kiln.limits import check_memory, kv_cache_bytes


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        n_ctx: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        initial: int = 256,
    ):
        self.config, self.n_ctx, self.device, self.dtype = config, n_ctx, device, dtype
        self.length = 0  # tokens stored so far (the next position)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._grow(min(initial, n_ctx))

    def _grow(self, capacity: int) -> None:
        c = self.config
        check_memory(
            kv_cache_bytes(c, capacity, self.dtype),
            self.device,
            f"a KV cache of {capacity} tokens ({c.n_layer} layers, {self.dtype})",
            "use a smaller context (-c / n_ctx) or fewer tokens",
        )
        k_shape = (capacity, c.n_head_kv, c.head_dim)
        v_shape = (capacity, c.n_head_kv, c.head_dim_v)
        new_k = [
            torch.zeros(k_shape, device=self.device, dtype=self.dtype) for _ in range(c.n_layer)
        ]
        new_v = [
            torch.zeros(v_shape, device=self.device, dtype=self.dtype) for _ in range(c.n_layer)
        ]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[: self.length] = old[: self.length]
        self.k, self.v, self.capacity = new_k, new_v, capacity

    def reserve(self, n_new: int) -> None:
        """Make room for n_new more tokens, or raise if the context would overflow."""
        need = self.length + n_new
        if need > self.n_ctx:
            raise UsageError(
                f"the context is full: {self.length} tokens stored + {n_new} new > n_ctx "
                f"{self.n_ctx}; use a larger context (n_ctx / --ctx-size) or a shorter prompt"
            )
        if need > self.capacity:
            cap = self.capacity
            while cap < need:
                cap *= 2
            self._grow(min(cap, self.n_ctx))

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k: [T, Hkv, D], v: [T, Hkv, Dv] stored at positions start..start+T-1."""
        self.k[layer][start : start + k.shape[0]] = k.to(self.dtype)
        self.v[layer][start : start + v.shape[0]] = v.to(self.dtype)

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:end], self.v[layer][:end]

    def truncate(self, length: int) -> None:
        """Forget everything from position `length` on (e.g. to re-run a prompt's last token)."""
        self.length = max(0, min(length, self.length))
