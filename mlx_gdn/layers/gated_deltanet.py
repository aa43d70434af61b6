"""fla's GatedDeltaNet layer (fla/layers/gated_deltanet.py), parameter names and shapes as fla's."""

import math

import mlx.core as mx
import mlx.nn as nn

from ..ops import gated_delta_rule
from ..ops.chunk import fused


def init_dt_bias(n):
    """fla's / mamba_ssm's: dt log-uniform in [1e-3, 0.1] (>= 1e-4), dt_bias its inverse softplus."""
    dt = mx.exp(mx.random.uniform(0, 1, (n,)) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt = mx.maximum(dt, 1e-4)
    return dt + mx.log(-mx.expm1(-dt))


class ShortConv(nn.Module):
    """Causal depthwise convolution + SiLU; weight [C, 1, K] as PyTorch's Conv1d(groups=C)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = False):
        super().__init__()
        scale = kernel_size ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (channels, 1, kernel_size))
        if bias:
            self.bias = mx.zeros((channels,))

    def __call__(self, x, state=None, segments=None):
        """x [B, T, C]; state: the previous K - 1 inputs [B, K - 1, C] or None (zeros); segments:
        the Documents of packed rows (an input from another document counts as zero).
        Returns (silu(conv(x)), new state)."""
        K = self.weight.shape[-1]
        if state is None:
            state = mx.zeros((x.shape[0], K - 1, x.shape[2]), dtype=x.dtype)
        full = mx.concatenate([state.astype(x.dtype), x], axis=1)
        T = x.shape[1]
        if T == 1:  # decode: one product over the K taps (2 ops, not 2K; launches dominate there)
            out = (full * mx.swapaxes(self.weight[:, 0, :], 0, 1)).sum(axis=1, keepdims=True)
            if "bias" in self:
                out = out + self.bias
            return nn.silu(out), full[:, 1:]
        masks = [segments.same(lag).astype(x.dtype) for lag in range(1, K)] if segments is not None else []
        bias = self.bias if "bias" in self else mx.zeros((x.shape[2],), dtype=x.dtype)
        return fused(_conv_taps_silu)(full, self.weight, bias, *masks), full[:, -(K - 1):]


def _conv_taps_silu(full, weight, bias, *lag_masks):
    """silu(bias + sum_i full[t + i] w_i) over the T = len(full) - (K - 1) outputs; lag_masks[l - 1]
    zeroes the tap `l` tokens back where it crosses a document boundary (packed rows). One compiled
    kernel on a GPU (chunk.fused), not 2K + 2 launches."""
    K = weight.shape[-1]
    T = full.shape[1] - (K - 1)
    out = bias
    for i in range(K):  # tap i reads the input `lag` tokens back
        term = full[:, i:i + T] * weight[:, 0, i]
        lag = K - 1 - i
        if lag_masks and lag:
            term = term * lag_masks[lag - 1]
        out = out + term
    return nn.silu(out)


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_v_heads=None,
                 expand_v: float = 2.0, conv_size: int = 4, use_gate: bool = True,
                 use_short_conv: bool = True, allow_neg_eigval: bool = False, norm_eps: float = 1e-6,
                 b_proj_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads or num_heads
        if self.num_v_heads % num_heads:
            raise ValueError(f"GatedDeltaNet: num_v_heads ({self.num_v_heads}) must be a multiple of "
                             f"num_heads ({num_heads})")
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_dim * expand_v)
        key_dim = num_heads * head_dim
        value_dim = self.num_v_heads * self.head_v_dim
        self.use_gate, self.use_short_conv = use_gate, use_short_conv
        self.allow_neg_eigval, self.norm_eps = allow_neg_eigval, norm_eps
        self.keep_chunk_pieces = False  # the op's memory-for-speed option (train.py sets it)
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads, bias=b_proj_bias)
        if use_short_conv:
            self.q_conv1d = ShortConv(key_dim, conv_size)
            self.k_conv1d = ShortConv(key_dim, conv_size)
            self.v_conv1d = ShortConv(value_dim, conv_size)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        # fla's init: A = U(0, 16) sampled in float32 (bf16 can round it to log 0 = -inf)
        self.A_log = mx.log(mx.random.uniform(0.0, 16.0, (self.num_v_heads,)))
        self.dt_bias = init_dt_bias(self.num_v_heads)

    def __call__(self, x, mask=None, cache=None, segments=None):
        """x [B, T, hidden]; mask [B, T] (True for real tokens, left padding) or None;
        cache: a GatedDeltaNetCache or None; segments: the Documents of packed rows (no document
        sees another: the rows become one varlen batch of the op)."""
        B, T, _ = x.shape
        if mask is not None:  # padding in, all zeros: inert in the convolutions and the state
            x = x * mask[..., None].astype(x.dtype)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            states = cache.conv if cache is not None else (None, None, None)
            (q, sq), (k, sk), (v, sv) = (conv(y, s, segments) for conv, y, s in zip(
                (self.q_conv1d, self.k_conv1d, self.v_conv1d), (q, k, v), states))
        else:
            q, k, v = nn.silu(q), nn.silu(k), nn.silu(v)
        q = q.reshape(B, T, self.num_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        a, b = self.a_proj(x), self.b_proj(x)
        packed = {}
        if segments is not None:
            q, k, v, a, b = (y.reshape(1, B * T, *y.shape[2:]) for y in (q, k, v, a, b))
            packed["cu_seqlens"] = segments.cu_seqlens
        o, state = gated_delta_rule(
            q, k, v, a, b,
            initial_state=None if cache is None else cache.state, output_final_state=cache is not None,
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=self.A_log,
            dt_bias=self.dt_bias, use_beta_sigmoid_in_kernel=True,
            allow_neg_eigval=self.allow_neg_eigval, keep_chunk_pieces=self.keep_chunk_pieces, **packed)
        o = o.reshape(B, T, self.num_v_heads, self.head_v_dim)
        if cache is not None:
            cache.state = state
            if self.use_short_conv:
                cache.conv = (sq, sk, sv)
            cache.offset += T
        o = self.o_norm(o)
        if self.use_gate:
            o = o * nn.silu(self.g_proj(x).reshape(B, T, self.num_v_heads, self.head_v_dim))
        return self.o_proj(o.reshape(B, T, -1))
