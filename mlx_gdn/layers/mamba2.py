"""Mamba2 mixer (SSD) in the mamba_ssm / Hugging Face naming: in_proj, conv1d, dt_bias, A_log, D, norm,
out_proj. Prefill uses the chunked SSD, decode (few tokens with a cache) the token loop."""

import mlx.core as mx
import mlx.nn as nn

from ..ops.ssd import ssd_chunked, ssd_recurrent
from .gated_deltanet import ShortConv, init_dt_bias

RECURRENT_MAX_TOKENS = 16


class GatedRMSNorm(nn.Module):
    """Mamba2's RMSNormGated (norm after gate): rmsnorm(y * silu(z)) per group of d_inner / G channels."""

    def __init__(self, dims: int, groups: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.groups, self.eps = groups, eps

    def __call__(self, y, z):
        y = y * nn.silu(z)
        shape = y.shape
        y = y.reshape(*shape[:-1], self.groups, -1)
        y = y * mx.rsqrt(mx.mean(y * y, axis=-1, keepdims=True) + self.eps)
        return y.reshape(shape) * self.weight


class Mamba2(nn.Module):
    def __init__(self, hidden_size: int, state_size: int = 128, expand: int = 2, head_dim: int = 64,
                 n_groups: int = 1, conv_size: int = 4, norm_eps: float = 1e-5, chunk_size: int = 64):
        super().__init__()
        self.d_inner = expand * hidden_size
        if self.d_inner % head_dim:
            raise ValueError(f"Mamba2: expand * hidden_size ({self.d_inner}) must divide by head_dim "
                             f"({head_dim})")
        self.num_heads = self.d_inner // head_dim
        if self.num_heads % n_groups:
            raise ValueError(f"Mamba2: heads ({self.num_heads}) must divide by n_groups ({n_groups})")
        self.head_dim, self.n_groups, self.state_size = head_dim, n_groups, state_size
        self.chunk_size = chunk_size
        conv_dim = self.d_inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(hidden_size, self.d_inner + conv_dim + self.num_heads, bias=False)
        self.conv1d = ShortConv(conv_dim, conv_size, bias=True)
        # mamba_ssm's init: A in [1, 16]
        self.A_log = mx.log(mx.random.uniform(1.0, 16.0, (self.num_heads,)))
        self.dt_bias = init_dt_bias(self.num_heads)
        self.D = mx.ones((self.num_heads,))
        self.norm = GatedRMSNorm(self.d_inner, n_groups, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=False)

    def __call__(self, x, mask=None, cache=None, segments=None):
        """x [B, T, hidden]; mask [B, T] (real tokens, left padding) or None; cache: Mamba2Cache or None;
        segments: the Documents of packed rows (each document's scan starts from zero)."""
        B, T, _ = x.shape
        if mask is not None:  # padding in, all zeros; its dt is zeroed below so the state ignores it
            x = x * mask[..., None].astype(x.dtype)
        z, xBC, dt = mx.split(self.in_proj(x), [self.d_inner, 2 * self.d_inner + 2 * self.n_groups
                                                * self.state_size], axis=-1)
        xBC, conv_state = self.conv1d(xBC, None if cache is None else cache.conv, segments)
        GN = self.n_groups * self.state_size
        xs, Bm, Cm = mx.split(xBC, [self.d_inner, self.d_inner + GN], axis=-1)
        xs = xs.reshape(B, T, self.num_heads, self.head_dim)
        Bm = Bm.reshape(B, T, self.n_groups, self.state_size)
        Cm = Cm.reshape(B, T, self.n_groups, self.state_size)
        dt = nn.softplus(dt.astype(mx.float32) + self.dt_bias)
        if mask is not None:
            dt = dt * mask[..., None]
        A = -mx.exp(self.A_log.astype(mx.float32))
        state = None if cache is None else cache.state
        if segments is not None:  # one scan per document, over the rows laid end to end
            bounds = segments.bounds
            x_f, dt_f, B_f, C_f = (a.reshape(1, B * T, *a.shape[2:]) for a in (xs, dt, Bm, Cm))
            parts = [ssd_chunked(x_f[:, s:e], dt_f[:, s:e], A, B_f[:, s:e], C_f[:, s:e], None,
                                 self.chunk_size)[0] for s, e in zip(bounds, bounds[1:])]
            y = mx.concatenate(parts, axis=1).reshape(xs.shape)
        elif cache is not None and T <= RECURRENT_MAX_TOKENS:
            y, state = ssd_recurrent(xs, dt, A, Bm, Cm, state)
        else:
            y, state = ssd_chunked(xs, dt, A, Bm, Cm, state, self.chunk_size)
        if cache is not None:
            cache.conv, cache.state = conv_state, state
            cache.offset += T
        y = y + xs.astype(mx.float32) * self.D[:, None]
        y = self.norm(y.reshape(B, T, -1).astype(x.dtype), z)
        return self.out_proj(y)
