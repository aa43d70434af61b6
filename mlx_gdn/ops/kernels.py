"""Launching the kernels of metal_kernels/ (Metal on a Mac, CUDA through MLX's CUDA build).

`backend()` says which path `gated_delta_rule` takes: "metal", "cuda", or "ops" (plain MLX ops, the
CPU path). MLX_GDN_BACKEND=ops forces the ops path. `use_factory` swaps the kernel compiler (the
tests run every kernel through a CPU emulator that is called like mx.fast.metal_kernel).
"""

import contextlib
import os

import mlx.core as mx

import metal_kernels

SPECS = {
    "decode_step": (["q", "k", "v", "g", "beta", "A_log", "dt_bias", "scale", "state_in"],
                    ["o", "state_out"]),
    "chunk_scan_fwd": (["W", "U", "Kt", "decay", "h0", "seg_first", "seg_last"],
                       ["states", "v_new", "h_final"]),
    "chunk_scan_bwd": (["PdO", "QdO", "Kt", "W", "decay", "dh_final", "seg_first", "seg_last"],
                       ["du", "dh_next", "dh0"]),
}
TG_COLUMNS = 4  # value columns (SIMD groups) per threadgroup

_override = None  # (backend name, factory) while use_factory is active
_compiled = {}


def backend():
    if _override is not None:
        return _override[0]
    if os.environ.get("MLX_GDN_BACKEND", "").lower() == "ops":
        return "ops"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "ops"


@contextlib.contextmanager
def use_factory(name, factory):
    """Within the block, backend() is `name` and kernels are built by `factory` (metal_kernel-like)."""
    global _override
    previous, _override = _override, (name, factory)
    try:
        yield
    finally:
        _override = previous


def get_kernel(name):
    which = backend()
    if which == "ops":
        raise RuntimeError("no kernel backend: Metal and CUDA are unavailable (or MLX_GDN_BACKEND=ops)")
    key = (which, name, id(_override[1]) if _override else None)
    if key not in _compiled:
        inputs, outputs = SPECS[name]
        if _override is not None:
            factory, header = _override[1], ""
        elif which == "metal":
            factory, header = mx.fast.metal_kernel, metal_kernels.prelude("metal")
        else:
            factory, header = mx.fast.cuda_kernel, metal_kernels.prelude("cuda")
        _compiled[key] = factory(name=name, input_names=inputs, output_names=outputs,
                                 source=metal_kernels.source(name), header=header)
    return _compiled[key]


def _segment_flags(segments, N):
    first, last = [-1] * N, [-1] * N
    for s, (c0, c1) in enumerate(segments):
        first[c0], last[c1 - 1] = s, s
    return mx.array(first, dtype=mx.int32), mx.array(last, dtype=mx.int32)


def _scan_launch(W, V, states, segments):
    """What both scan kernels share: sizes, segment flags, template, grid (rows R = B * HV)."""
    NB, HV, C, K = W.shape
    S = len(segments)
    B = states.shape[0] // S
    N, R = NB // B, B * HV
    first, last = _segment_flags(segments, N)
    launch = dict(template=[("K", K), ("V", V), ("C", C), ("N", N), ("R", R)], grid=(32, V, R),
                  threadgroup=(32, min(TG_COLUMNS, V), 1), output_dtypes=[mx.float32] * 3)
    return (N, R, S, B, HV, C, K), (first, last), launch


def scan_forward(W, U, Kt, decay, h0, segments):
    """Kernel twin of chunk._scan_forward (same arguments and results)."""
    V = U.shape[-1]
    (N, R, S, B, HV, C, K), flags, launch = _scan_launch(W, V, h0, segments)
    states, v_new, h_final = get_kernel("chunk_scan_fwd")(
        inputs=[W, U, Kt, decay.reshape(N, R), h0, *flags],
        output_shapes=[(N, R, K, V), (N, R, C, V), (S * R, K, V)], **launch)
    return (states.reshape(N * B, HV, K, V), v_new.reshape(N * B, HV, C, V),
            h_final.reshape(S * B, HV, K, V))


def scan_backward(PdO, QdO, Kt, W, decay, dhT, segments):
    """Kernel twin of chunk._scan_backward (same arguments and results)."""
    V = PdO.shape[-1]
    (N, R, S, B, HV, C, K), flags, launch = _scan_launch(W, V, dhT, segments)
    du, dh_next, dh0 = get_kernel("chunk_scan_bwd")(
        inputs=[PdO, QdO, Kt, W, decay.reshape(N, R), dhT, *flags],
        output_shapes=[(N, R, C, V), (N, R, K, V), (S * R, K, V)], **launch)
    return (du.reshape(N * B, HV, C, V), dh_next.reshape(N * B, HV, K, V),
            dh0.reshape(S * B, HV, K, V))


def decode_step(q, k, v, g, beta, state, *, scale, A_log=None, dt_bias=None, l2norm=False,
                gate=False, beta_sigmoid=False, neg_eigval=False):
    """The fused recurrent step: raw inputs in (q, k [B,T,H,K]; v [B,T,HV,V]; g, beta [B,T,HV];
    state [B,HV,K,V] float32), the in-kernel options applied inside. Returns (o in q's dtype, state)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    A_log = mx.zeros((HV,)) if A_log is None else A_log.astype(mx.float32)
    has_bias = dt_bias is not None
    dt_bias = dt_bias.astype(mx.float32) if has_bias else mx.zeros((HV,))
    dtype = q.dtype
    o, state_out = get_kernel("decode_step")(
        inputs=[q, k.astype(dtype), v.astype(dtype), g.astype(mx.float32), beta.astype(mx.float32),
                A_log, dt_bias, mx.array([scale], dtype=mx.float32), state.astype(mx.float32)],
        template=[("InT", dtype), ("K", K), ("V", V), ("HQ", H), ("HV", HV), ("T", T),
                  ("L2NORM", l2norm), ("GATE", gate), ("HAS_DT_BIAS", has_bias),
                  ("BETA_SIGMOID", beta_sigmoid), ("NEG_EIGVAL", neg_eigval)],
        grid=(32, V, B * HV), threadgroup=(32, min(TG_COLUMNS, V), 1),
        output_shapes=[(B, T, HV, V), (B, HV, K, V)], output_dtypes=[dtype, mx.float32])
    return o, state_out
