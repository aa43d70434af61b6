"""The chunk kernels (the scan kernels.SCAN_KERNEL selects, the chunk pieces, the layout kernels)
against the ops path (chunk.py, gated_delta.py), and the pieces' inverse against float64: shared by
the emulator tests and the GPU tests."""

import mlx.core as mx
import numpy as np

from mlx_gdn.ops import chunk, gated_delta, kernels
from reference import rms_rel


def check_scans(N, B, HV, C, K, V, segments, tol=1e-5, k_dtype=mx.float32, bf16_products=False):
    """Both kernel scans (forward, reverse), which read k (in k_dtype) and gamma, against the ops
    scans of chunk.py, which read Kt = k e^{gamma_C - gamma} and decay = e^{gamma_C}; bf16_products
    as the op passes it for bfloat16 inputs."""
    segments = segments or ((0, N),)
    S = len(segments)
    rng = np.random.default_rng(N * K + V)
    r = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    W, U, k = r(N * B, HV, C, K) * 0.1, r(N * B, HV, C, V), (r(N * B, HV, C, K) * 0.1).astype(k_dtype)
    g = mx.array(-rng.uniform(0.0, 0.05, (N * B, HV, C, 1)).astype(np.float32))
    gamma, _, tail, decay = chunk._gates(g)
    Kt = k.astype(mx.float32) * tail
    h0 = r(S * B, HV, K, V)
    ref = chunk._scan_forward(W, U, Kt, decay, h0, segments)
    got = kernels.scan_forward(W, U, k, gamma, h0, segments, bf16_products)
    for name, a, b in zip(("states", "v_new", "h_final"), ref, got):
        assert rms_rel(np.array(a), np.array(b)) <= tol, name

    PdO, QdO, dhT = r(N * B, HV, C, V), r(N * B, HV, K, V), r(S * B, HV, K, V)
    ref = chunk._scan_backward(PdO, QdO, Kt, W, decay, dhT, segments)
    got = kernels.scan_backward(PdO, QdO, k, W, gamma, dhT, segments, bf16_products)
    for name, a, b in zip(("du", "dh_next", "dh0"), ref, got):
        assert rms_rel(np.array(a), np.array(b)) <= tol, name


def _chunk_inputs(M, C, K, V, dtype=mx.float32):
    """Random chunk-major q, k, v (rounded to dtype, then float32 again), g, beta of M chunks (one
    head), and the normal sampler used."""
    rng = np.random.default_rng(M * C + K + V)
    r = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    q, k, v = r(M, 1, C, K) / np.sqrt(K), r(M, 1, C, K) / np.sqrt(K), r(M, 1, C, V)
    q, k, v = (x.astype(dtype).astype(mx.float32) for x in (q, k, v))
    g = mx.array(-rng.uniform(0.0, 0.2, (M, 1, C, 1)).astype(np.float32))
    beta = mx.array(rng.uniform(0.0, 1.0, (M, 1, C, 1)).astype(np.float32))
    return r, (q, k, v, g, beta)


def check_pieces(M, C, K, V, tol=1e-5, dtype=mx.float32):
    """The chunk pieces kernel (run by whatever kernels.backend() is; q, k, v given in dtype)
    against the ops pieces, in full and as the forward asks for them (P, W, U alone)."""
    _, (q, k, v, g, beta) = _chunk_inputs(M, C, K, V, dtype)
    typed = [x.astype(dtype) for x in (q, k, v)]
    got = chunk._ChunkPieces(*typed, g, beta)
    with kernels.use_factory("ops", None):
        ref = chunk._ChunkPieces(q, k, v, g, beta)
    for name in ("KKG", "A", "Gam", "P", "Tinv", "W", "U", "eg", "decay"):
        a, b = np.array(getattr(ref, name)), np.array(getattr(got, name))
        assert a.shape == b.shape and rms_rel(a, b) <= tol, name
    A64 = np.array(got.A).astype(np.float64)
    inverse = np.linalg.inv(np.eye(C) + A64)
    assert rms_rel(inverse, np.array(got.Tinv)) <= tol, "Tinv vs float64"
    forward = chunk._ChunkPieces(*typed, g, beta, all_pieces=False)
    assert forward.KKG is None and forward.Tinv is None
    for name in ("P", "W", "U"):
        assert np.array_equal(np.array(getattr(got, name)), np.array(getattr(forward, name))), name


def pieces_oracle(q, k, v, g, beta):
    """P, W, U, T of chunk-major inputs in float64 (numpy): the definitions in chunk_pieces.metal."""
    q, k, v, g, beta = (np.array(x).astype(np.float64) for x in (q, k, v, g, beta))
    C = q.shape[-2]
    gamma = np.cumsum(g, axis=-2)
    Gam = np.exp(gamma - np.swapaxes(gamma, -1, -2)) * np.tril(np.ones((C, C)))
    P = q @ np.swapaxes(k, -1, -2) * Gam
    A = beta * (k @ np.swapaxes(k, -1, -2) * Gam * np.tril(np.ones((C, C)), -1))
    T = np.linalg.inv(np.eye(C) + A)
    return P, T @ (k * beta * np.exp(gamma)), T @ (v * beta), T


def check_pieces_bf16_products(M, C, K, V, tol=1e-5):
    """The forward's chunk pieces with 8x8 BF16 products (kernels.pieces_mma; bfloat16 q, k, v as
    the forward passes them) against the float64 oracle: P from exact products of the bfloat16 q and
    k (float sums); W and U at bfloat16's level (T and the scaled k, v rounded, as fla's w/u), and
    visibly rounded (the BF16 path ran); T exact (step 3 keeps float precision)."""
    _, (q, k, v, g, beta) = _chunk_inputs(M, C, K, V, mx.bfloat16)
    P, W, U, T = pieces_oracle(q, k, v, g, beta)
    gamma = mx.cumsum(g, axis=-2)
    typed = [x.astype(mx.bfloat16) for x in (q, k, v)]
    _, got_P, got_T, got_W, got_U = kernels.chunk_pieces(*typed, gamma, beta, all_pieces=True, mma=True)
    assert rms_rel(P, np.array(got_P)) <= tol and rms_rel(T, np.array(got_T)) <= tol
    for want, got in ((W, got_W), (U, got_U)):
        assert 2e-4 <= rms_rel(want, np.array(got)) <= 1e-2
    forward = kernels.chunk_pieces(*typed, gamma, beta, all_pieces=False, mma=True)
    for a, b in zip((got_P, got_W, got_U), (forward[1], forward[3], forward[4])):
        assert np.array_equal(np.array(a), np.array(b))


def check_output(M, C, K, V, dtype=mx.float32, bf16_products=False, tol=1e-5):
    """The output kernel (chunk_output, forced) against chunk._output (float32 GEMMs) and a float64
    oracle: o = diag(e^gamma) q S + P u, written in dtype; bf16_products as the op passes it."""
    rng = np.random.default_rng(M * C + K + V)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    q, S, u = r(M, 1, C, K) / np.sqrt(K), r(M, 1, K, V), r(M, 1, C, V)
    P = np.tril(r(M, 1, C, C)) / np.sqrt(C)
    g = -rng.uniform(0.0, 0.2, (M, 1, C, 1)).astype(np.float32)
    gamma = np.cumsum(g, axis=-2)
    oracle = np.exp(gamma.astype(np.float64)) * (q.astype(np.float64) @ S) + P.astype(np.float64) @ u
    xs = [mx.array(x) for x in (q, S, P, u, gamma)]
    ref = chunk._output(xs[0], mx.exp(xs[4]), xs[1], xs[2], xs[3])
    got = kernels.chunk_output(*xs, dtype, bf16_products)
    assert got is not None and got.dtype == dtype and got.shape == (M, 1, C, V)
    got = np.array(got.astype(mx.float32))
    assert rms_rel(oracle, np.array(ref)) <= 1e-5
    assert rms_rel(oracle, got) <= tol and rms_rel(np.array(ref), got) <= tol


def check_layout(B, T, H, HV, D, C, cu_seqlens, l2norm, dtype, tol=1e-5):
    """The layout kernels (rows_to_chunks, chunks_to_rows), each as the other's VJP, against the ops
    layout (gated_delta._to_chunks / _from_chunks after the L2 norm, scale and head repeat) and its
    autodiff."""
    rng = np.random.default_rng(T + D)
    r = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    packed = cu_seqlens is not None
    seqs = list(zip(cu_seqlens, cu_seqlens[1:])) if packed else [(0, T)] * B
    src, dst = gated_delta._layout_maps(seqs, T, C, packed)
    scale = D ** -0.5
    grad_tol = tol if dtype == mx.float32 else 4e-3  # gradients rounded once to the half type

    def ops_to_chunks(x):
        x = x.astype(mx.float32)
        x = (gated_delta.l2_normalize(x) if l2norm else x) * scale
        return gated_delta._to_chunks(mx.repeat(x, HV // H, axis=2), seqs, C, packed)

    x = r(B, T, H, D)
    y_ref = ops_to_chunks(x)
    y = kernels.rows_to_chunks(x, src, HV, C, scale=scale, l2norm=l2norm)
    assert rms_rel(np.array(y_ref), np.array(y)) <= tol
    # in the input's type (k and v on a GPU): the float32 values rounded once, and unscaled without
    # the L2 norm exactly the input
    typed = kernels.rows_to_chunks(x, src, HV, C, l2norm=l2norm, dtype=dtype)
    assert typed.dtype == dtype
    rounding = 0.0 if dtype == mx.float32 else 2.0 ** -8
    assert rms_rel(np.array(y_ref / scale), np.array(typed.astype(mx.float32))) <= tol + rounding
    if not l2norm:
        exact = gated_delta._to_chunks(mx.repeat(x, HV // H, axis=2), seqs, C, packed)
        assert np.array_equal(np.array(exact.astype(mx.float32)), np.array(typed.astype(mx.float32)))
    cot = mx.array(rng.standard_normal(y_ref.shape).astype(np.float32))
    (dx_ref,) = mx.vjp(ops_to_chunks, [x], [cot])[1]
    dx = kernels.chunks_to_rows(cot, dst, B, H, dtype, scale=scale, x=x if l2norm else None)
    assert dx.dtype == dtype
    assert rms_rel(np.array(dx_ref.astype(mx.float32)), np.array(dx.astype(mx.float32))) <= grad_tol

    # the output direction: chunk-major float32 back to token rows in the input dtype, and its VJP
    ops_from_chunks = lambda y: gated_delta._from_chunks(y, seqs, T, B, packed).astype(dtype)
    o_ref, o = ops_from_chunks(cot), kernels.chunks_to_rows(cot, dst, B, HV, dtype)
    assert o.dtype == dtype and np.array_equal(np.array(o_ref.astype(mx.float32)),
                                               np.array(o.astype(mx.float32)))
    do = r(B, T, HV, D)
    (dy_ref,) = mx.vjp(ops_from_chunks, [cot], [do])[1]
    assert np.array_equal(np.array(dy_ref), np.array(kernels.rows_to_chunks(do, src, HV, C)))


def check_grads(M, C, K, V, tol=1e-5, dtype=mx.float32):
    """The chunk grads kernel (after the reverse scan; q, k, v given in dtype) against
    chunk._backward_after_scan."""
    r, (q, k, v, g, beta) = _chunk_inputs(M, C, K, V, dtype)
    with kernels.use_factory("ops", None):
        pc = chunk._ChunkPieces(q, k, v, g, beta)
    do, u, du = r(M, 1, C, V), r(M, 1, C, V), r(M, 1, C, V)
    states, dh_next = r(M, 1, K, V), r(M, 1, K, V)
    ref = chunk._backward_after_scan(q, k, v, beta, do, states, u, du, dh_next, q * pc.eg, pc.incl,
                                     pc.strict, pc.Gam, pc.eg, pc.tail, pc.decay, pc.KKG, pc.A, pc.P,
                                     pc.Tinv, pc.W, pc.U, pc.Kt)
    typed = [x.astype(dtype) for x in (q, k, v)]
    got = chunk._backward_after_scan_kernel(*typed, beta, do, states, u, du, dh_next, pc)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), ref, got):
        assert a.shape == b.shape and rms_rel(np.array(a), np.array(b)) <= tol, name
