"""The chunk-scan kernels (whichever kernels.SCAN_KERNEL selects) against chunk.py's ops scans: shared
by the emulator tests and the GPU tests."""

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
