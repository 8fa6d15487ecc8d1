"""The frozen trunk's output per sample, kept after its first pass (TrainConfig.cache_frozen).

With trainable_layers = k, blocks 0 .. L-k-1 and the embeddings are frozen: the input of block
L-k (the residual stream there) is a function of a sample's tokens alone, the same in every
epoch. The first forward of a sample captures it (a forward pre-hook on block L-k); later
micro-batches whose samples are all captured start at block L-k with it, so the frozen blocks run
once per sample instead of once per epoch. A sample is keyed by its index and row kind (SFT
record, or DPO chosen / rejected); its tensor is [tokens, hidden], on the CPU, in the dtype of
the residual stream (float32 over float32 weights, autocast included). Memory: samples x tokens x
hidden floats (SmolLM2-135M on the quick preset's 462 records: about 270 MB).

Padded micro-batches hold row r's tokens at [r, :len_r]; packed ones (batches.Packed) at
rows[r, :len_r] of the packed row, the shared prefix once. Padding positions start at zero: by
causality nothing that a loss reads attends to them.
"""
from __future__ import annotations

import torch

from srlm_engine.train.batches import Encoded, Packed, row_lengths


class TrunkCache:
    def __init__(self, llama: torch.nn.Module, start: int):
        self.start = start  # the first trained block
        self.rows: dict[tuple[int, int], torch.Tensor] = {}
        self._pending: list[tuple[tuple[int, int], torch.Tensor]] | None = None
        llama.layers[start].register_forward_pre_hook(self._capture)

    @staticmethod
    def keys(idx: list[int], dpo: bool) -> list[tuple[int, int]]:
        """One key per row of batches.collate(enc, idx, ...): chosen rows (kind 0), then rejected (1)."""
        return [(i, 0) for i in idx] + ([(i, 1) for i in idx] if dpo else [])

    def inputs(self, enc: Encoded, idx: list[int], dpo: bool, shape: torch.Size, packed: Packed | None,
               device: torch.device) -> torch.Tensor | None:
        """Block `start`'s input for this micro-batch, in its layout ([B, T, H] padded or [1, N, H]
        packed), or None if a sample was not seen yet; then its forward captures what is missing."""
        keys = self.keys(idx, dpo)
        missing = [k for k in keys if k not in self.rows]
        if missing:
            lens = row_lengths(enc, idx, dpo)
            self._pending = [(k, packed.rows[r, :n] if packed is not None else (r, n))
                             for r, (k, n) in enumerate(zip(keys, lens)) if k in missing]
            return None
        rows = [self.rows[k] for k in keys]
        if packed is not None:
            shared = int((packed.segments == 0).sum())
            return torch.cat([rows[0][:shared]] + [x[shared:] for x in rows])[None].to(device)
        out = rows[0].new_zeros((*shape, rows[0].shape[-1]))
        for r, x in enumerate(rows):
            out[r, :len(x)] = x
        return out.to(device)

    def _capture(self, module, args) -> None:
        if self._pending is None:
            return  # a forward that starts here, or a recomputation in backward
        x = args[0].detach()
        for key, where in self._pending:
            self.rows[key] = (x[0, where] if isinstance(where, torch.Tensor) else x[where[0], :where[1]]).cpu()
        self._pending = None
