"""The gated delta rule in chunks (WY/UT form), with a hand-written backward.

Layout inside this module is chunk-major: q, k [N, B, HV, C, K]; v [N, B, HV, C, V]; g, beta
[N, B, HV, C]; every batched matmul runs over (N, B, HV) at once and only the scan over the N
chunks is sequential. Per chunk, with gamma the within-chunk cumsum of g and
Gam_ij = exp(gamma_i - gamma_j) (i >= j, else 0):

    A = strict_tril(diag(beta) (K K^T) * Gam)      Tinv = (I + A)^-1
    W = Tinv diag(beta e^gamma) K                   U = Tinv diag(beta) V
    u = U - W h                                     (the chunk's "new values")
    h' = e^{gamma_C} h + (K * e^{gamma_C - gamma})^T u
    O = (Q * e^gamma) h + tril((Q K^T) * Gam) u

The backward recomputes the cheap C x C pieces, keeps one K x V state per chunk (never one per
token), and runs the reverse scan for dh. Sequences of a packed batch (`segments`) occupy
consecutive chunks; the scans restart at each segment's first chunk.
"""

import os

import mlx.core as mx

BASE_BLOCK = 16  # size of the diagonal blocks inverted by the nilpotent product


def _t(x):
    return mx.swapaxes(x, -1, -2)


def _mm_nt(a, b):
    # a @ b^T. MLX's CPU GEMM runs twice as slow on a transposed right operand; a copy is cheaper.
    return a @ mx.contiguous(_t(b))


def _masks(C):
    i = mx.arange(C)
    return i[:, None] >= i[None, :], i[:, None] > i[None, :]


def _decay_matrix(gamma, incl):
    # exp(gamma_i - gamma_j) on i >= j only: the exponent above the diagonal is replaced *before* exp,
    # so no inf is formed and nothing masked is ever multiplied.
    diff = gamma[..., :, None] - gamma[..., None, :]
    return mx.exp(mx.where(incl, diff, -mx.inf))


def invert_unit_lower(A):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a power of two.

    Blocks of 16 use (I+A)^-1 = (I-A)(I+A^2)(I+A^4)(I+A^8) (A^16 = 0); larger sizes merge two halves
    with T21 = -T22 A21 T11. About C^3/2 flops instead of the C^3 log C of squaring the whole chunk.
    """
    C = A.shape[-1]
    if C <= BASE_BLOCK:
        eye = mx.eye(C, dtype=A.dtype)
        inv = eye - A
        power, p = A, 2
        while p < C:
            power = power @ power
            inv = inv + inv @ power
            p *= 2
        return inv
    h = C // 2
    t11 = invert_unit_lower(A[..., :h, :h])
    t22 = invert_unit_lower(A[..., h:, h:])
    t21 = -(t22 @ (A[..., h:, :h] @ t11))
    top = mx.concatenate([t11, mx.zeros_like(t11)], axis=-1)
    return mx.concatenate([top, mx.concatenate([t21, t22], axis=-1)], axis=-2)


class _ChunkPieces:
    """The per-chunk quantities both passes derive from q, k, v, g, beta (cheap to recompute)."""

    def __init__(self, q, k, g, beta):
        C = q.shape[-2]
        self.incl, self.strict = _masks(C)
        self.gamma = mx.cumsum(g, axis=-1)
        self.Gam = _decay_matrix(self.gamma, self.incl)
        self.eg = mx.exp(self.gamma)
        glast = self.gamma[..., -1:]
        self.tail = mx.exp(glast - self.gamma)  # decay from each token to the chunk's end
        self.decay = mx.exp(glast[..., 0])  # [N, B, HV]: decay across the whole chunk
        self.KKG = mx.where(self.strict, _mm_nt(k, k) * self.Gam, 0.0)
        self.A = self.KKG * beta[..., None]
        self.P = mx.where(self.incl, _mm_nt(q, k) * self.Gam, 0.0)


def _scan_forward(W, U, Kt, decay, h0, segments):
    """h_{n+1} = decay_n h_n + Kt_n^T (U_n - W_n h_n), restarting at each segment from h0."""
    nb = W.shape[1]
    states, new_values, finals = [], [], []
    for s, (c0, c1) in enumerate(segments):
        h = h0[s * nb:(s + 1) * nb]
        for n in range(c0, c1):
            states.append(h)
            u = U[n] - W[n] @ h
            new_values.append(u)
            h = decay[n][..., None, None] * h + _t(Kt[n]) @ u
        finals.append(h)
    return mx.stack(states), mx.stack(new_values), mx.concatenate(finals)


def _scan_backward(PdO, QdO, Kt, W, decay, dhT, segments):
    """Reverse scan: du_n = PdO_n + Kt_n dh_{n+1};  dh_n = decay_n dh_{n+1} + QdO_n - W_n^T du_n."""
    nb = W.shape[1]
    N = W.shape[0]
    du, dh_next = [None] * N, [None] * N
    dh0 = [None] * len(segments)
    for s in range(len(segments) - 1, -1, -1):
        c0, c1 = segments[s]
        dh = dhT[s * nb:(s + 1) * nb]
        for n in range(c1 - 1, c0 - 1, -1):
            dh_next[n] = dh
            du[n] = PdO[n] + Kt[n] @ dh
            dh = decay[n][..., None, None] * dh + QdO[n] - _t(W[n]) @ du[n]
        dh0[s] = dh
    return mx.stack(du), mx.stack(dh_next), mx.concatenate(dh0)


def chunk_forward(q, k, v, g, beta, h0, segments):
    """Returns (o, final states, per-chunk start states, new values u, W, U, Tinv)."""
    pc = _ChunkPieces(q, k, g, beta)
    Tinv = invert_unit_lower(pc.A)
    W = Tinv @ (k * (beta * pc.eg)[..., None])
    U = Tinv @ (v * beta[..., None])
    Kt = k * pc.tail[..., None]
    states, u, hT = _scan_forward(W, U, Kt, pc.decay, h0, segments)
    o = (q * pc.eg[..., None]) @ states + pc.P @ u
    return o, hT, states, u, W, U, Tinv


def chunk_backward(q, k, v, g, beta, segments, do, dhT, states, u, W, U, Tinv):
    """Gradients (dq, dk, dv, dg, dbeta, dh0) of chunk_forward's (o, hT)."""
    pc = _ChunkPieces(q, k, g, beta)
    Qg = q * pc.eg[..., None]
    Kt = k * pc.tail[..., None]
    du, dh_next, dh0 = _scan_backward(_t(pc.P) @ do, _t(Qg) @ do, Kt, W, pc.decay, dhT, segments)

    # through u = U - W h and the state update h' = decay h + Kt^T u
    dW = -_mm_nt(du, states)
    dKt = _mm_nt(u, dh_next)
    dQg = _mm_nt(do, states)
    dP = mx.where(pc.incl, _mm_nt(do, u), 0.0)
    # through W = Tinv Kb, U = Tinv Vb, Tinv = (I + A)^-1:  dA = -Tinv^T (dW Kb^T + dU Vb^T) Tinv^T
    # = -(dKb W^T + dVb U^T), with dKb = Tinv^T dW and dVb = Tinv^T dU.
    dKb = _t(Tinv) @ dW
    dVb = _t(Tinv) @ du
    dA = mx.where(pc.strict, -(_mm_nt(dKb, W) + _mm_nt(dVb, U)), 0.0)

    dPG = dP * pc.Gam  # cotangent of Q K^T
    dKK = dA * pc.Gam * beta[..., None]  # cotangent of K K^T (strict lower)
    dq = dQg * pc.eg[..., None] + dPG @ k
    dk = (_t(dPG) @ q + dKt * pc.tail[..., None] + dKb * (beta * pc.eg)[..., None]
          + (dKK + _t(dKK)) @ k)
    dv = dVb * beta[..., None]

    dKb_k = mx.sum(dKb * k, axis=-1)  # cotangent of beta * e^gamma
    dbeta = mx.sum(dVb * v, axis=-1) + pc.eg * dKb_k + mx.sum(dA * pc.KKG, axis=-1)

    # dg_t = sum_{s >= t} dgamma_s (gamma = cumsum(g) within the chunk). gamma enters through e^gamma
    # (Qg, Kb), the chunk decay, and differences gamma_i - gamma_j (Gam in P and A, the tail decay in
    # Kt). A difference term's suffix sum is a block sum with i >= t > j: summed in that form, not as
    # rowsum - colsum, so nothing cancels in float32.
    zKt = mx.sum(dKt * Kt, axis=-1)
    dgamma = mx.sum(dQg * Qg, axis=-1) + beta * pc.eg * dKb_k
    dchunk = pc.decay * mx.sum(states * dh_next, axis=(-2, -1))
    rows_below = mx.cumsum(dP * pc.P + dA * pc.A, axis=-2, reverse=True)  # [t, j] = sum_{i >= t}
    dg = (mx.cumsum(dgamma, axis=-1, reverse=True) + dchunk[..., None]
          + mx.sum(mx.where(pc.strict, rows_below, 0.0), axis=-1)
          + mx.cumsum(zKt, axis=-1) - zKt)
    return dq, dk, dv, dg, dbeta, dh0


_cpu_streams = []


def _over_head_groups(fn, inputs, head_axes, out_head_axes):
    """Run fn on groups of value heads, one CPU stream (thread) per group, and concatenate.

    MLX runs each CPU stream on its own thread but one GEMM on one core; heads are independent, so
    splitting them over the cores is the parallelism the CPU build leaves on the table. On a GPU
    (or one core) this is a plain call.
    """
    heads = inputs[0].shape[head_axes[0]]
    parts = min(heads, os.cpu_count() or 1)
    if mx.default_device() != mx.cpu or parts < 2:
        return fn(*inputs)
    while len(_cpu_streams) < parts:
        _cpu_streams.append(mx.new_stream(mx.cpu))
    bounds = [heads * i // parts for i in range(parts + 1)]
    results = []
    for stream, lo, hi in zip(_cpu_streams, bounds, bounds[1:]):
        with mx.stream(stream):
            part = [mx.take(x, mx.arange(lo, hi), axis=a) if a is not None else x
                    for x, a in zip(inputs, head_axes)]
            results.append(fn(*part))
    return tuple(mx.concatenate(outs, axis=a) for outs, a in zip(zip(*results), out_head_axes))


# value-head axis of each array: chunk-major inputs [N, B, HV, ...], states [S * B, HV, K, V]
_IN_AXES = (2, 2, 2, 2, 2, 1)
_FWD_OUT_AXES = (2, 1, 2, 2, 2, 2, 2)
_BWD_OUT_AXES = (2, 2, 2, 2, 2, 1)


def chunk_gated_delta(q, k, v, g, beta, h0, segments):
    """Chunked gated delta rule with its own VJP. Chunk-major inputs (see the module docstring);
    h0: [S * B, HV, K, V] for S segments. Returns (o [N, B, HV, C, V], final states like h0)."""

    def forward(q, k, v, g, beta, h0):
        return chunk_forward(q, k, v, g, beta, h0, segments)

    def backward(q, k, v, g, beta, do, dhT, states, u, W, U, Tinv):
        return chunk_backward(q, k, v, g, beta, segments, do, dhT, states, u, W, U, Tinv)

    @mx.custom_function
    def core(q, k, v, g, beta, h0):
        return _over_head_groups(forward, (q, k, v, g, beta, h0), _IN_AXES, _FWD_OUT_AXES)

    @core.vjp
    def core_vjp(primals, cotangents, outputs):
        q, k, v, g, beta, _ = primals
        do, dhT = cotangents[0], cotangents[1]
        _, _, states, u, W, U, Tinv = outputs
        return _over_head_groups(backward, (q, k, v, g, beta, do, dhT, states, u, W, U, Tinv),
                                 _IN_AXES[:5] + (2, 1, 2, 2, 2, 2, 2), _BWD_OUT_AXES)

    o, hT, *_ = core(q, k, v, g, beta, h0)
    return o, hT
