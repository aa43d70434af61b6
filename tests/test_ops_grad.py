"""Gradients of the chunked path's own VJP: against autodiff through the token loop, and against
float64 finite differences of the NumPy oracle."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gdn.layers.documents import Documents
from mlx_gdn.layers.gated_deltanet import ShortConv
from mlx_gdn.ops import chunk, gated_delta, gated_delta_rule, kernels
from reference import assert_close, gated_delta_reference, make_inputs, rms_rel

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def weights(data, seed=100):
    """Random cotangents for o and the final state: loss = <o, w_o> + <S_T, w_s>."""
    rng = np.random.default_rng(seed)
    B, T, HV, V = data["v"].shape
    n_states = data["initial_state"].shape[0]
    K = data["k"].shape[-1]
    return rng.standard_normal((B, T, HV, V)), rng.standard_normal((n_states, HV, K, V))


def mlx_grads(data, mode, dtype=mx.float32, extra=(), **kw):
    """Gradients of the weighted loss w.r.t. q, k, v, g, beta, h0 and the named `extra` options."""
    w_o, w_s = (mx.array(w.astype(np.float32)) for w in weights(data))
    names = list(NAMES) + list(extra)
    values = [mx.array(data[n]) for n in NAMES] + [mx.array(kw.pop(n)) for n in extra]
    values = [x.astype(dtype) if i < 5 else x for i, x in enumerate(values)]

    def loss(*xs):
        args = dict(zip(names, xs))
        o, s = gated_delta_rule(**args, output_final_state=True, mode=mode, **kw)
        return (o.astype(mx.float32) * w_o).sum() + (s * w_s).sum()

    grads = mx.grad(loss, argnums=list(range(len(names))))(*values)
    return {n: np.array(gr.astype(mx.float32)) for n, gr in zip(names, grads)}


CASES = [
    # B, T, H, HV, K, V, kwargs
    (2, 75, 2, 4, 60, 60, {}),
    (1, 130, 1, 1, 100, 64, dict(chunk_size=32)),
    (1, 200, 2, 8, 64, 64, dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                allow_neg_eigval=True)),
    (2, 63, 4, 4, 64, 32, dict(chunk_size=16)),
]


@pytest.mark.parametrize("B,T,H,HV,K,V,kw", CASES)
def test_chunk_vjp_matches_autodiff_of_recurrence(B, T, H, HV, K, V, kw):
    data = make_inputs(T * K, B, T, H, HV, K, V, mask_p=0.3, h0=True,
                       unit_k=not kw.get("use_qk_l2norm_in_kernel", False))
    ref = mlx_grads(data, "recurrent", **kw)
    got = mlx_grads(data, "chunk", **kw)
    for n in NAMES:
        assert rms_rel(ref[n], got[n]) <= 1e-5, n


def test_gate_in_kernel_grads():
    rng = np.random.default_rng(2)
    data = make_inputs(3, 1, 100, 2, 4, 32, mask_p=0.0, h0=True)
    data["g"] = (rng.standard_normal(data["g"].shape) * 3).astype(np.float32)
    opts = dict(A_log=np.log(rng.uniform(1, 16, 4)).astype(np.float32),
                dt_bias=rng.standard_normal(4).astype(np.float32))
    ref = mlx_grads(data, "recurrent", extra=("A_log", "dt_bias"), use_gate_in_kernel=True, **opts)
    got = mlx_grads(data, "chunk", extra=("A_log", "dt_bias"), use_gate_in_kernel=True, **opts)
    for n in list(NAMES) + ["A_log", "dt_bias"]:
        assert rms_rel(ref[n], got[n]) <= 1e-5, n


def test_varlen_grads_match_recurrence():
    cu = [0, 15, 80, 81, 150]
    data = make_inputs(6, 1, 150, 2, 4, 32, mask_p=0.3, h0=True, n_states=4)
    ref = mlx_grads(data, "recurrent", cu_seqlens=cu)
    got = mlx_grads(data, "chunk", cu_seqlens=mx.array(cu), chunk_size=16)
    for n in NAMES:
        assert rms_rel(ref[n], got[n]) <= 1e-5, n


def finite_differences(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = f()
        flat[i] = keep - eps
        down = f()
        flat[i] = keep
        gflat[i] = (up - down) / (2 * eps)
    return grad


def test_against_float64_finite_differences():
    rng = np.random.default_rng(4)
    data = make_inputs(17, 1, 21, 1, 2, 8, 6, mask_p=0.3, h0=True, unit_k=False)
    data["beta"] = rng.standard_normal(data["beta"].shape).astype(np.float32)
    data["g"] = rng.standard_normal(data["g"].shape).astype(np.float32)
    opts = dict(A_log=np.log(rng.uniform(1, 16, 2)).astype(np.float32),
                dt_bias=rng.standard_normal(2).astype(np.float32))
    flags = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                 use_gate_in_kernel=True)
    got = mlx_grads(data, "chunk", extra=("A_log", "dt_bias"), chunk_size=16, **flags, **opts)

    w_o, w_s = weights(data)
    x64 = {n: np.array(x, np.float64) for n, x in list(data.items()) + list(opts.items())}

    def loss():
        o, s = gated_delta_reference(**{n: x64[n] for n in data}, A_log=x64["A_log"],
                                     dt_bias=x64["dt_bias"], **flags)
        return (o * w_o).sum() + (s * w_s).sum()

    for n in list(NAMES) + ["A_log", "dt_bias"]:
        fd = finite_differences(loss, x64[n])
        assert rms_rel(fd, got[n]) <= 1e-4, n


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_low_precision_grads(dtype):
    # fla's tolerances against an fp32 computation on the same (rounded) inputs
    data = make_inputs(23, 1, 130, 2, 4, 64, mask_p=0.3, h0=True)
    rounded = {n: (x if n == "initial_state" else np.array(mx.array(x).astype(dtype).astype(mx.float32)))
               for n, x in data.items()}
    ref = mlx_grads(rounded, "recurrent")
    got = mlx_grads(data, "chunk", dtype=dtype)
    for n in NAMES:
        assert_close(n, ref[n], got[n], 2e-2 if n in ("g", "beta") else 8e-3)


def test_block_by_block_grads_match_recurrence(monkeypatch):
    from mlx_gdn.ops import chunk
    # forward blocks of 3 chunks, backward blocks of 2: the two passes split differently
    monkeypatch.setattr(chunk, "REFERENCE_TOKEN_FLOATS", 0)  # block sizes as set, at any head width
    monkeypatch.setattr(chunk, "BLOCK_TOKENS", 48)
    monkeypatch.setattr(chunk, "BACKWARD_BLOCK_TOKENS", 32)
    cu = [0, 15, 100, 101, 170]
    data = make_inputs(9, 1, 170, 2, 4, 32, mask_p=0.3, h0=True, n_states=4)
    ref = mlx_grads(data, "recurrent", cu_seqlens=cu)
    got = mlx_grads(data, "chunk", cu_seqlens=cu, chunk_size=16)
    for n in NAMES:
        assert rms_rel(ref[n], got[n]) <= 1e-5, n


def test_kept_chunk_pieces_grads_match_recurrence(monkeypatch):
    # keep_chunk_pieces: the backward takes the forward's pieces instead of forming them again. Over
    # several blocks (forward 3 chunks, backward 2) and packed sequences; the inversions' chunks
    # recorded: the forward's blocks only (the backward's have 2 chunks).
    monkeypatch.setattr(chunk, "REFERENCE_TOKEN_FLOATS", 0)
    monkeypatch.setattr(chunk, "BLOCK_TOKENS", 48)
    monkeypatch.setattr(chunk, "BACKWARD_BLOCK_TOKENS", 32)
    inversions = []
    invert = chunk.invert_unit_lower
    monkeypatch.setattr(chunk, "invert_unit_lower", lambda A: inversions.append(A.shape) or invert(A))
    cu = [0, 15, 100, 101, 170]  # 1 + 6 + 1 + 5 chunks of 16
    data = make_inputs(9, 1, 170, 2, 4, 32, mask_p=0.3, h0=True, n_states=4)
    ref = mlx_grads(data, "recurrent", cu_seqlens=cu)
    got = mlx_grads(data, "chunk", cu_seqlens=cu, chunk_size=16, keep_chunk_pieces=True)
    assert sorted({shape[0] for shape in inversions}) == [1, 3]  # blocks of 3 chunks and the last
    for n in NAMES:
        assert rms_rel(ref[n], got[n]) <= 1e-5, n
    inversions.clear()
    mlx_grads(data, "chunk", cu_seqlens=cu, chunk_size=16, keep_chunk_pieces=False)
    assert sorted({shape[0] for shape in inversions}) == [1, 2, 3]  # the backward forms them again


def test_whole_op_compiled_matches_and_retraces_on_a_setting(monkeypatch):
    # on a GPU the chunked op (unpacked rows) runs under mx.compile: here on the CPU's ops path. Its
    # settings are read while tracing, so a changed one (the block size) must give a new trace.
    data = make_inputs(6, 2, 100, 2, 4, 32, mask_p=0.2, h0=True, unit_k=False)
    ref = mlx_grads(data, "chunk", chunk_size=16)
    monkeypatch.setattr(chunk, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(gated_delta, "_whole_op_fns", {})
    got = mlx_grads(data, "chunk", chunk_size=16)
    assert len(gated_delta._whole_op_fns) == 1
    monkeypatch.setattr(chunk, "REFERENCE_TOKEN_FLOATS", 0)  # block sizes as set, at any head width
    monkeypatch.setattr(chunk, "BLOCK_TOKENS", 32)  # blocks of 2 chunks instead of one block
    monkeypatch.setattr(chunk, "BACKWARD_BLOCK_TOKENS", 32)
    blocked = mlx_grads(data, "chunk", chunk_size=16)
    assert len(gated_delta._whole_op_fns) == 2
    kernels.forget_kernels()  # a swapped kernel body must be traced anew (ab_settings)
    assert not gated_delta._whole_op_fns and not chunk._compiled
    for n in NAMES:
        assert rms_rel(ref[n], got[n]) <= 1e-6, n
        assert rms_rel(ref[n], blocked[n]) <= 1e-5, n


def test_compiled_functions_match_uncompiled(monkeypatch):
    # on a GPU the element-wise chains, the input preparation with its hand-written VJP and the short
    # convolutions run under mx.compile (chunk.fused): the same functions compiled here on the CPU
    rng = np.random.default_rng(5)
    data = make_inputs(4, 1, 90, 2, 4, 32, mask_p=0.2, h0=True, unit_k=False)
    data["g"] = rng.standard_normal(data["g"].shape).astype(np.float32)
    data["beta"] = rng.standard_normal(data["beta"].shape).astype(np.float32)
    opts = dict(use_gate_in_kernel=True, use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                allow_neg_eigval=True, chunk_size=32)
    params = dict(A_log=np.log(rng.uniform(1, 16, 4)).astype(np.float32),
                  dt_bias=rng.standard_normal(4).astype(np.float32))
    extra = ("A_log", "dt_bias")
    conv = ShortConv(24, 4)
    x = mx.array(rng.standard_normal((2, 30, 24)).astype(np.float32))
    docs = Documents(mx.array(np.repeat([[0, 1, 2], [3, 3, 4]], [12, 8, 10], axis=1)), 3)

    def conv_loss(w, x):
        conv.weight = w
        return conv(x, None, docs)[0].square().sum()

    conv_grad = mx.grad(conv_loss, argnums=(0, 1))

    def run():
        got = mlx_grads(data, "chunk", extra=extra, **params, **opts)
        return got, [np.array(y) for y in conv_grad(conv.weight, x)] + [np.array(conv(x, None, docs)[0])]

    ref, ref_conv = run()
    monkeypatch.setattr(chunk, "COMPILE_ON_CPU", True)
    monkeypatch.setattr(gated_delta, "_chunked_fns", {})
    got, got_conv = run()
    assert chunk._compiled, "nothing was compiled"
    for n in list(NAMES) + list(extra):
        assert rms_rel(ref[n], got[n]) <= 1e-6, n
    for a, b in zip(ref_conv, got_conv):
        assert rms_rel(a, b) <= 1e-6
