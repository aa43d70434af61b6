"""Mamba2's SSD scan (state space duality), chunked for prefill/training and token by token for decode.

Per batch row and head h (state S is P x N, float32):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        y_t = S_t C_t

x [B, T, H, P]; dt [B, T, H] (after softplus); A [H] (negative); B, C [B, T, G, N] with head h reading
group h // (H / G). The chunked form is the gated delta rule's without the delta (W = 0):
within a chunk, gamma = cumsum(dt A), Gam_ij = exp(gamma_i - gamma_j) (i >= j),
Y = (C * e^gamma) S_n + tril((C B^T) * Gam) (dt x),  S_{n+1} = e^{gamma_last} S_n + (B * e^{gamma_last - gamma})^T (dt x).
Gradients come from MLX's autodiff (the graph holds one P x N state per chunk, not per token).
"""

import mlx.core as mx

from .chunk import _decay_matrix, _masks, _mm_nt


def _prepare(x, dt, A, B, C):
    H, G = x.shape[2], B.shape[2]
    if G != H:
        B, C = mx.repeat(B, H // G, axis=2), mx.repeat(C, H // G, axis=2)
    f32 = mx.float32
    return x.astype(f32) * dt.astype(f32)[..., None], dt.astype(f32) * A.astype(f32), B.astype(f32), C.astype(f32)


def ssd_recurrent(x, dt, A, B, C, initial_state=None):
    """Token loop; returns (y [B, T, H, P] float32, final state [B, H, P, N])."""
    xdt, log_a, B, C = _prepare(x, dt, A, B, C)
    Bsz, T, H, P = x.shape
    S = initial_state if initial_state is not None else mx.zeros((Bsz, H, P, B.shape[-1]))
    ys = []
    for t in range(T):
        S = mx.exp(log_a[:, t])[..., None, None] * S + xdt[:, t][..., :, None] * B[:, t][..., None, :]
        ys.append((S @ C[:, t][..., :, None])[..., 0])
    return mx.stack(ys, axis=1), S


def ssd_chunked(x, dt, A, B, C, initial_state=None, chunk_size=64):
    """Chunked SSD; same results as ssd_recurrent."""
    xdt, log_a, B, C = _prepare(x, dt, A, B, C)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    Cs = chunk_size
    pad = -T % Cs
    if pad:
        xdt, B, C = (mx.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (xdt, B, C))
        log_a = mx.pad(log_a, [(0, 0), (0, pad), (0, 0)])
    n = (T + pad) // Cs
    # [B, n, C, H, d] -> [n, B, H, C, d]
    chunks = lambda a: a.reshape(Bsz, n, Cs, H, -1).transpose(1, 0, 3, 2, 4)
    V, K, Q, g = chunks(xdt), chunks(B), chunks(C), chunks(log_a[..., None])
    incl, _ = _masks(Cs)
    gamma = mx.cumsum(g, axis=-2)
    Gam = _decay_matrix(gamma, incl)
    glast = gamma[..., -1:, :]
    intra = mx.where(incl, _mm_nt(Q, K) * Gam, 0.0) @ V  # [n, B, H, C, P]
    Kt = K * mx.exp(glast - gamma)
    decay = mx.exp(glast)  # [n, B, H, 1, 1]
    S = initial_state.swapaxes(-1, -2) if initial_state is not None else mx.zeros((Bsz, H, N, P))
    outs = []
    for i in range(n):  # state kept as [N, P] (key-first, as the delta rule's)
        outs.append((Q[i] * mx.exp(gamma[i])) @ S + intra[i])
        S = decay[i] * S + mx.swapaxes(Kt[i], -1, -2) @ V[i]
    y = mx.stack(outs).transpose(1, 0, 3, 2, 4).reshape(Bsz, n * Cs, H, P)[:, :T]
    return y, S.swapaxes(-1, -2)
