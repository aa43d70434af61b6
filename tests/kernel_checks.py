"""The chunk kernels (the scan kernels.SCAN_KERNEL selects, the chunk pieces) against chunk.py's ops
path, and the pieces' inverse against float64: shared by the emulator tests and the GPU tests."""

import mlx.core as mx
import numpy as np

from mlx_gdn.ops import chunk, kernels
from reference import rms_rel


def check_scans(N, B, HV, C, K, V, segments, tol=1e-5):
    """Both kernel scans (forward, reverse) against the ops scans of chunk.py."""
    segments = segments or ((0, N),)
    S = len(segments)
    rng = np.random.default_rng(N * K + V)
    r = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    W, U, Kt = r(N * B, HV, C, K) * 0.1, r(N * B, HV, C, V), r(N * B, HV, C, K) * 0.1
    decay = mx.array(rng.uniform(0.5, 1.0, (N * B, HV, 1, 1)).astype(np.float32))
    h0 = r(S * B, HV, K, V)
    ref = chunk._scan_forward(W, U, Kt, decay, h0, segments)
    got = kernels.scan_forward(W, U, Kt, decay, h0, segments)
    for name, a, b in zip(("states", "v_new", "h_final"), ref, got):
        assert rms_rel(np.array(a), np.array(b)) <= tol, name

    PdO, QdO, dhT = r(N * B, HV, C, V), r(N * B, HV, K, V), r(S * B, HV, K, V)
    ref = chunk._scan_backward(PdO, QdO, Kt, W, decay, dhT, segments)
    got = kernels.scan_backward(PdO, QdO, Kt, W, decay, dhT, segments)
    for name, a, b in zip(("du", "dh_next", "dh0"), ref, got):
        assert rms_rel(np.array(a), np.array(b)) <= tol, name


def check_pieces(M, C, K, V, tol=1e-5):
    """The chunk pieces kernel (run by whatever kernels.backend() is) against the ops pieces."""
    rng = np.random.default_rng(M * C + K + V)
    r = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    q, k, v = r(M, 1, C, K) / np.sqrt(K), r(M, 1, C, K) / np.sqrt(K), r(M, 1, C, V)
    g = mx.array(-rng.uniform(0.0, 0.2, (M, 1, C, 1)).astype(np.float32))
    beta = mx.array(rng.uniform(0.0, 1.0, (M, 1, C, 1)).astype(np.float32))
    got = chunk._ChunkPieces(q, k, v, g, beta)
    with kernels.use_factory("ops", None):
        ref = chunk._ChunkPieces(q, k, v, g, beta)
    for name in ("KKG", "A", "Gam", "P", "Tinv", "W", "U", "Kt", "eg", "decay"):
        a, b = np.array(getattr(ref, name)), np.array(getattr(got, name))
        assert a.shape == b.shape and rms_rel(a, b) <= tol, name
    A64 = np.array(got.A).astype(np.float64)
    inverse = np.linalg.inv(np.eye(C) + A64)
    assert rms_rel(inverse, np.array(got.Tinv)) <= tol, "Tinv vs float64"
