"""Packed training rows: document ids and what the layers derive from them, computed once a forward."""

import mlx.core as mx
import numpy as np


class Documents:
    """Document ids [B, T] of packed rows (no document sees another). The model builds this once per
    forward, outside any gradient checkpoint, and every layer reads what it needs: `ids` (attention
    masks), `bounds` / `cu_seqlens` (the rows laid end to end, split at every document start and row
    start: the GDN op's packed sequences, Mamba2's scans) and `same(lag)` (whether a token and the
    one `lag` back share a document: the short convolutions' taps)."""

    def __init__(self, ids: mx.array, max_lag: int):
        self.ids = ids
        seg = np.asarray(ids)
        B, T = seg.shape
        starts = np.ones((B, T), dtype=bool)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        self.bounds = np.append(np.flatnonzero(starts.reshape(-1)), B * T).tolist()
        self.cu_seqlens = mx.array(self.bounds, dtype=mx.int32)
        head = lambda lag: mx.zeros((B, min(lag, T)), dtype=mx.bool_)
        self._same = {lag: mx.concatenate([head(lag), ids[:, lag:] == ids[:, :-lag]], axis=1)[:, :T, None]
                      for lag in range(1, max_lag + 1)}

    def same(self, lag: int) -> mx.array:
        """[B, T, 1] bool: token t and token t - lag are of one document (False for t < lag)."""
        return self._same[lag]
