"""The attention layer against an independent PyTorch reference written from the definition (fla's
attention needs flash-attn, which cannot be installed here): RoPE rotate-half on the full head,
GQA (query head h reads key/value head h // (heads / kv_heads)), causal, a window of w keys
including the token itself. Long inputs exercise the blocked sliding-window path."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gdn.layers import Attention

torch = pytest.importorskip("torch")


def torch_attention(x, wq, wk, wv, wo, heads, kv_heads, window, theta=10000.0):
    B, T, _ = x.shape
    d = wq.shape[0] // heads
    q = (x @ wq.T).view(B, T, heads, d).transpose(1, 2)
    k = (x @ wk.T).view(B, T, kv_heads, d).transpose(1, 2)
    v = (x @ wv.T).view(B, T, kv_heads, d).transpose(1, 2)
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(t):
        t1, t2 = t[..., :d // 2], t[..., d // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)

    q, k = rope(q), rope(k)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None]
    allowed = (j <= i) & ((j > i - window) if window else torch.ones_like(j <= i))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(B, T, -1) @ wo.T


@pytest.mark.parametrize("T,heads,kv_heads,window", [(40, 4, 4, None), (40, 4, 2, None), (200, 4, 2, 8),
                                                     (300, 2, 1, 100)])
def test_attention_matches_torch_reference(T, heads, kv_heads, window):
    mx.random.seed(T)
    hidden = 32
    layer = Attention(hidden, heads, kv_heads, window_size=window)
    x = mx.random.normal((2, T, hidden))
    got = np.array(layer(x))
    t = lambda a: torch.tensor(np.array(a), dtype=torch.float64)
    want = torch_attention(t(x), t(layer.q_proj.weight), t(layer.k_proj.weight), t(layer.v_proj.weight),
                           t(layer.o_proj.weight), heads, kv_heads, window).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
