"""Mamba2's SSD scan: chunked vs a float64 NumPy recurrence, and gradients vs the token loop."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gdn.ops.ssd import ssd_chunked, ssd_recurrent
from reference import rms_rel


def inputs(seed, B=2, T=75, H=4, P=16, G=2, N=8):
    rng = np.random.default_rng(seed)
    return dict(x=rng.standard_normal((B, T, H, P)), dt=rng.uniform(0.001, 0.5, (B, T, H)),
                A=-rng.uniform(1, 16, H), B=rng.standard_normal((B, T, G, N)),
                C=rng.standard_normal((B, T, G, N)), initial_state=rng.standard_normal((B, H, P, N)))


def numpy_ssd(x, dt, A, B, C, initial_state):
    Bsz, T, H, P = x.shape
    G = B.shape[2]
    y = np.zeros_like(x)
    S = initial_state.copy()
    for t in range(T):
        for h in range(H):
            g = h // (H // G)
            S[:, h] = np.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h] \
                + dt[:, t, h][:, None, None] * x[:, t, h][:, :, None] * B[:, t, g][:, None, :]
            y[:, t, h] = np.einsum("bpn,bn->bp", S[:, h], C[:, t, g])
    return y, S


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_matches_float64(chunk_size):
    data = inputs(0)
    ry, rs = numpy_ssd(**data)
    y, s = ssd_chunked(**{k: mx.array(v.astype(np.float32)) for k, v in data.items()}, chunk_size=chunk_size)
    assert rms_rel(ry, np.array(y)) <= 1e-5 and rms_rel(rs, np.array(s)) <= 1e-5
    y, s = ssd_recurrent(**{k: mx.array(v.astype(np.float32)) for k, v in data.items()})
    assert rms_rel(ry, np.array(y)) <= 1e-5 and rms_rel(rs, np.array(s)) <= 1e-5


def test_chunked_grads_match_token_loop():
    data = {k: mx.array(v.astype(np.float32)) for k, v in inputs(1, T=40).items()}
    w = mx.array(np.random.default_rng(2).standard_normal((2, 40, 4, 16)).astype(np.float32))
    names = list(data)

    def grads(fn):
        loss = lambda *xs: (fn(*xs)[0] * w).sum() + fn(*xs)[1].sum()
        return mx.grad(loss, argnums=list(range(len(names))))(*data.values())

    ref = grads(ssd_recurrent)
    got = grads(lambda *xs: ssd_chunked(*xs, chunk_size=16))
    for n, a, b in zip(names, ref, got):
        assert rms_rel(np.array(a), np.array(b)) <= 1e-5, n
