"""Softmax attention with RoPE (rotate-half, as fla), GQA and an optional sliding window."""

import mlx.core as mx
import mlx.nn as nn


class Attention(nn.Module):
    """window_size w: a token sees itself and the w - 1 tokens before it (fla's (w - 1, 0))."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads=None, window_size=None,
                 rope_theta: float = 10000.0, qkv_bias: bool = False):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"Attention: hidden_size ({hidden_size}) must divide by num_heads "
                             f"({num_heads}), and num_heads by num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.window_size = window_size
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.rope = nn.RoPE(self.head_dim, traditional=False, base=rope_theta)

    def __call__(self, x, mask=None, cache=None, segments=None):
        """x [B, T, hidden]; mask [B, T] (True for real tokens) or None; cache: AttentionCache or None;
        segments: the Documents of packed rows (a token sees its own document only)."""
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.offset
        q = self.q_proj(x).reshape(B, T, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        valid = mx.ones((B, T), dtype=mx.bool_) if mask is None else mask.astype(mx.bool_)
        if cache is not None:
            k, v, valid, first = cache.update(k, v, valid, self.window_size)
        else:
            first = 0
        # key j sits at position first + j, query i at offset + i. With a window, queries go in blocks
        # of `window` against the keys they can see: memory ~ T x 2w instead of T x T.
        block = T if self.window_size is None else max(self.window_size, 64)
        outs = []
        for i0 in range(0, T, block):
            i1 = min(T, i0 + block)
            j0 = 0 if self.window_size is None else max(0, offset + i0 - self.window_size + 1 - first)
            j1 = offset + i1 - first
            outs.append(self._attend(q[:, :, i0:i1], k[:, :, j0:j1], v[:, :, j0:j1], offset + i0,
                                     first + j0, valid[:, j0:j1],
                                     None if segments is None else (segments.ids[:, i0:i1], segments.ids[:, j0:j1])))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))

    def _attend(self, q, k, v, q_first, k_first, valid, segments):
        q_pos = mx.arange(q_first, q_first + q.shape[2])[:, None]
        k_pos = mx.arange(k_first, k_first + k.shape[2])[None]
        allowed = k_pos <= q_pos
        if self.window_size is not None:
            allowed = allowed & (k_pos > q_pos - self.window_size)
        allowed = allowed[None, None] & valid[:, None, None, :]
        if segments is not None:
            allowed = allowed & (segments[0][:, None, :, None] == segments[1][:, None, None, :])
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, mask=allowed)
