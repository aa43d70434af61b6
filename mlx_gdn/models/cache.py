"""Decode caches, one object per layer (`Model.make_cache()` builds the list)."""

import mlx.core as mx


class GatedDeltaNetCache:
    """Conv states (the last K - 1 pre-conv inputs of q, k, v) and the float32 state [B, HV, K, V]."""

    def __init__(self):
        self.conv = (None, None, None)
        self.state = None
        self.offset = 0


class Mamba2Cache:
    """Conv state (the last K - 1 pre-conv inputs of x, B, C) and the SSD state [B, H, P, N] float32."""

    def __init__(self):
        self.conv = None
        self.state = None
        self.offset = 0


class AttentionCache:
    """Keys and values seen so far; with a window, only the last window - 1 are kept (bounded)."""

    def __init__(self):
        self.keys = self.values = self.valid = None
        self.first = 0  # position of the first kept key
        self.offset = 0  # position of the next token

    def update(self, k, v, valid, window_size):
        """Appends this call's keys; returns (keys, values, valid, position of keys[0]) to attend to."""
        if self.keys is not None:
            k = mx.concatenate([self.keys, k], axis=2)
            v = mx.concatenate([self.values, v], axis=2)
            valid = mx.concatenate([self.valid, valid], axis=1)
        first = self.first
        keep = k.shape[2] if window_size is None else min(k.shape[2], window_size - 1)
        self.keys, self.values, self.valid = k[:, :, -keep:], v[:, :, -keep:], valid[:, -keep:]
        if keep == 0:
            self.keys = self.values = self.valid = None
        self.offset = first + k.shape[2]
        self.first = self.offset - keep
        return k, v, valid, first
