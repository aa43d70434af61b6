"""Forward values of mlx_gdn.ops.gated_delta_rule against the float64 NumPy oracle."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gdn.ops import gated_delta_rule, kernels
from reference import assert_close, gated_delta_reference, make_inputs, rms_rel

FP32_TOL = 1e-5
LOW_TOL = 5e-3  # fla's tolerance for o and the final state in bf16 / fp16


def run(data, dtype=mx.float32, **kw):
    arrays = {n: (None if x is None else mx.array(x)) for n, x in data.items()}
    for n in ("q", "k", "v", "g", "beta"):
        arrays[n] = arrays[n].astype(dtype)
    o, s = gated_delta_rule(**arrays, output_final_state=True, **kw)
    assert o.dtype == dtype and s.dtype == mx.float32
    return np.array(o.astype(mx.float32)), np.array(s)


def oracle(data, **kw):
    return gated_delta_reference(**data, **kw)


# fla's matrix (SPEC §1): odd T, non-power-of-two D, GVA groupings, decay normaliser, zeroed gates
MATRIX = [
    # B, T, H, HV, D, normalizer, mask_p
    (1, 63, 1, 1, 64, 1.0, 0.0),
    (2, 75, 4, 4, 60, 0.1, 0.5),
    (1, 130, 2, 4, 100, 10.0, 0.0),
    (1, 500, 2, 8, 128, 1.0, 0.5),
    (2, 130, 4, 4, 128, 0.01, 0.0),
    (1, 75, 2, 8, 64, 1.0, 1.0),  # every gate exactly 0: no decay at all
]


@pytest.mark.parametrize("B,T,H,HV,D,normalizer,mask_p", MATRIX)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_matrix_fp32(B, T, H, HV, D, normalizer, mask_p, mode):
    data = make_inputs(T + D, B, T, H, HV, D, normalizer=normalizer, mask_p=mask_p, h0=True)
    ro, rs = oracle(data)
    o, s = run(data, mode=mode)
    assert rms_rel(ro, o) <= FP32_TOL
    assert rms_rel(rs, s) <= FP32_TOL


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_sizes_and_unequal_kv(chunk_size):
    data = make_inputs(7, 2, 100, 2, 4, 48, 80, mask_p=0.3, h0=True)
    ro, rs = oracle(data, scale=0.3)
    o, s = run(data, mode="chunk", chunk_size=chunk_size, scale=0.3)
    assert rms_rel(ro, o) <= FP32_TOL and rms_rel(rs, s) <= FP32_TOL


OPTIONS = [
    dict(use_qk_l2norm_in_kernel=True),
    dict(use_beta_sigmoid_in_kernel=True),
    dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, use_qk_l2norm_in_kernel=True),
    dict(use_gate_in_kernel=True),
    dict(use_gate_in_kernel=True, with_dt_bias=True, use_qk_l2norm_in_kernel=True),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "+".join(sorted(o)))
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_options(opts, mode):
    opts = dict(opts)
    rng = np.random.default_rng(3)
    data = make_inputs(11, 2, 90, 2, 4, 64, mask_p=0.2, h0=True,
                       unit_k=not opts.get("use_qk_l2norm_in_kernel", False))
    if opts.get("use_beta_sigmoid_in_kernel"):
        data["beta"] = rng.standard_normal(data["beta"].shape).astype(np.float32) * 2
    if opts.get("use_gate_in_kernel"):
        data["g"] = rng.standard_normal(data["g"].shape).astype(np.float32) * 3
        data["g"][0, :5] = 30.0  # softplus's linear branch above 20
        opts["A_log"] = np.log(rng.uniform(1, 16, 4)).astype(np.float32)
        if opts.pop("with_dt_bias", False):
            opts["dt_bias"] = rng.standard_normal(4).astype(np.float32)
    ro, rs = oracle(data, **opts)
    mx_opts = {n: (mx.array(x) if isinstance(x, np.ndarray) else x) for n, x in opts.items()}
    o, s = run(data, mode=mode, **mx_opts)
    assert rms_rel(ro, o) <= FP32_TOL and rms_rel(rs, s) <= FP32_TOL


@pytest.mark.parametrize("cu", [[0, 15], [0, 256, 500, 1000], [0, 15, 100, 300, 1200, 2000],
                                [0, 1, 2, 67, 131]])
def test_varlen(cu):
    T = cu[-1]
    data = make_inputs(len(cu) + T, 1, T, 2, 4, 32, mask_p=0.3, h0=True, n_states=len(cu) - 1)
    ro, rs = oracle(data, cu_seqlens=cu)
    for mode in (["chunk", "recurrent"] if T <= 500 else ["chunk"]):
        o, s = run(data, mode=mode, cu_seqlens=mx.array(cu))
        assert rms_rel(ro, o) <= FP32_TOL and rms_rel(rs, s) <= FP32_TOL, mode


def test_varlen_equals_separate_calls():
    cu = [0, 40, 41, 170]
    data = make_inputs(5, 1, 170, 2, 2, 32, h0=True, n_states=3)
    o, s = run(data, mode="chunk", cu_seqlens=cu)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        part = {n: x[:, a:b] for n, x in data.items() if n != "initial_state"}
        part["initial_state"] = data["initial_state"][i:i + 1]
        o_i, s_i = run(part, mode="chunk")
        np.testing.assert_allclose(o[:, a:b], o_i, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(s[i:i + 1], s_i, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split", [1, 64, 100])
def test_split_with_carried_state_equals_one_call(split):
    data = make_inputs(9, 2, 150, 2, 4, 64, mask_p=0.2, h0=True)
    o, s = run(data, mode="chunk")
    first = {n: (x if n == "initial_state" else x[:, :split]) for n, x in data.items()}
    o1, s1 = run(first)  # auto: the token loop for a short first part
    second = {n: x[:, split:] for n, x in data.items() if n != "initial_state"}
    o2, s2 = run(dict(second, initial_state=s1))
    np.testing.assert_allclose(np.concatenate([o1, o2], axis=1), o, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(s2, s, atol=2e-5, rtol=1e-4)


def test_chunk_agrees_with_recurrent():
    data = make_inputs(21, 1, 200, 2, 2, 64, normalizer=0.05, mask_p=0.5, h0=True)
    oc, sc = run(data, mode="chunk")
    orr, sr = run(data, mode="recurrent")
    assert rms_rel(orr, oc) <= FP32_TOL and rms_rel(sr, sc) <= FP32_TOL


def test_state_v_first():
    data = make_inputs(4, 2, 70, 2, 2, 32, 48, h0=True)
    ro, rs = oracle(data)
    v_first = dict(data, initial_state=np.swapaxes(data["initial_state"], -1, -2).copy())
    o, s = run(v_first, mode="chunk", state_v_first=True)
    assert s.shape == (2, 2, 48, 32)
    assert rms_rel(ro, o) <= FP32_TOL and rms_rel(np.swapaxes(rs, -1, -2), s) <= FP32_TOL


def test_no_state_and_no_final_state():
    data = make_inputs(8, 1, 40, 1, 1, 32)
    ro, _ = oracle(data)
    arrays = {n: mx.array(x) for n, x in data.items() if x is not None}
    o, s = gated_delta_rule(**arrays)
    assert s is None and rms_rel(ro, np.array(o)) <= FP32_TOL


def test_zero_gate_long_sequence_stays_finite():
    # g = 0 everywhere with chunk 64: no decay, Gam = 1, nothing may overflow (fla #104, #389)
    data = make_inputs(12, 1, 300, 1, 2, 64, mask_p=1.0, h0=True)
    ro, rs = oracle(data)
    o, s = run(data, mode="chunk")
    assert np.isfinite(o).all() and rms_rel(ro, o) <= FP32_TOL and rms_rel(rs, s) <= FP32_TOL


def test_strong_decay_stays_finite():
    # decay normaliser 0.01: g down to ~ -70 per token, exp differences underflow to exactly 0
    data = make_inputs(13, 1, 130, 2, 2, 64, normalizer=0.01, h0=True)
    ro, rs = oracle(data)
    o, s = run(data, mode="chunk")
    assert rms_rel(ro, o) <= FP32_TOL and rms_rel(rs, s) <= FP32_TOL


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_low_precision(dtype, mode):
    data = make_inputs(31, 1, 130, 2, 4, 64, mask_p=0.3, h0=True)
    rounded = {n: (x if n == "initial_state" else np.array(mx.array(x).astype(dtype).astype(mx.float32)))
               for n, x in data.items()}
    ro, rs = oracle(rounded)
    o, s = run(data, dtype=dtype, mode=mode)
    assert_close("o", ro, o, LOW_TOL)
    assert_close("state", rs, s, LOW_TOL)


@pytest.mark.parametrize("cu", [None, [0, 15, 100, 230, 231, 300]])
def test_blocks_carry_the_state(monkeypatch, cu):
    # long inputs run block by block; blocks of 2 chunks here, so segments cross block boundaries
    from mlx_gdn.ops import chunk
    monkeypatch.setattr(chunk, "REFERENCE_TOKEN_FLOATS", 0)  # block sizes as set, at any head width
    monkeypatch.setattr(chunk, "BLOCK_TOKENS", 32)
    n_states = len(cu) - 1 if cu else 2
    data = make_inputs(41, 1 if cu else 2, 300, 2, 4, 32, mask_p=0.2, h0=True, n_states=n_states)
    ro, rs = oracle(data, cu_seqlens=cu)
    o, s = run(data, mode="chunk", chunk_size=16, cu_seqlens=cu)
    assert rms_rel(ro, o) <= FP32_TOL and rms_rel(rs, s) <= FP32_TOL



@pytest.mark.parametrize("C", [16, 32, 48, 64])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_decay_matrix_against_float64(C, scale):
    # exp(gamma_i - gamma_j) below the diagonal, 0 above; blockwise products for C = 32, 64 (the
    # exponent range reaches ~2000 at scale 30: no factor may overflow)
    from mlx_gdn.ops import chunk
    rng = np.random.default_rng(C)
    g = -rng.exponential(scale, (3, 2, C, 1))
    g[0, 0, ::5] = 0.0  # stretches without decay
    gamma = np.cumsum(g, axis=-2).astype(np.float32)
    got = np.array(chunk._decay_matrix(mx.array(gamma), chunk._masks(C)[0]))
    gamma = gamma.astype(np.float64)
    diff = gamma - np.swapaxes(gamma, -1, -2)
    want = np.where(np.tril(np.ones((C, C), bool)), np.exp(np.minimum(diff, 0.0)), 0.0)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)


def test_zero_states_come_from_one_kept_buffer(monkeypatch):
    # the absent initial state: the first n of one zero buffer per (heads, K, V), grown as needed;
    # fresh zeros past ZERO_STATES_CACHED floats
    monkeypatch.setattr(kernels, "_constants", {})
    first, fewer, more = (kernels.zero_states(n, 2, 4, 8) for n in (3, 2, 5))
    for x, n in ((first, 3), (fewer, 2), (more, 5)):
        assert x.shape == (n, 2, 4, 8) and x.dtype == mx.float32 and not np.any(np.array(x))
    assert kernels._constants[("zero states", 2, 4, 8)].shape[0] == 5
    monkeypatch.setattr(kernels, "ZERO_STATES_CACHED", 100)
    big = kernels.zero_states(6, 2, 4, 8)
    assert big.shape == (6, 2, 4, 8) and not np.any(np.array(big))
    assert kernels._constants[("zero states", 2, 4, 8)].shape[0] == 5  # not kept
