"""The decode step of one (model, KV cache) captured as a CUDA graph and replayed per token (the
`cuda_graphs` fusion): one graph launch instead of hundreds of kernel launches, the host only
writes the token and position and reads back what it samples."""

from __future__ import annotations

import torch

from kiln.models.common import DecoderModel
from kiln.runtime.kv_cache import KVCache


class DecodeGraph:
    def __init__(self, model: DecoderModel, cache: KVCache):
        assert cache.capacity == cache.n_ctx, "a captured step needs the cache at its full size"
        device = model.device
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        # Warm-up and capture write K/V at the last row, which no sequence reads before writing
        # it again: the rows of the sequence being decoded stay intact.
        self.position = torch.full((1,), cache.capacity - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compiles the kernels, settles the allocator
            for _ in range(2):
                model.decode_step(self.token, self.position, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.token, self.position, cache)

    def __call__(self, token: int, position: int) -> torch.Tensor:
        """-> logits float32 [1, n_vocab]: a buffer the next replay overwrites."""
        self.token.fill_(token)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits
