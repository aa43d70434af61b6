"""On a real GPU (marker `gpu`; run on the device machine through MLX's CUDA build, or on a Mac):
the kernels through mx.fast.cuda_kernel / metal_kernel against the ops path, the float64 oracle and,
where installed, fla 0.6.0's Triton kernels on the same inputs.

MLX runs float32 matmuls as TF32 on tensor-core GPUs unless MLX_ENABLE_TF32=0 (errors ~4e-4): the
float32 parity checks here need it off, so run them as `MLX_ENABLE_TF32=0 pytest -m gpu`.
"""

import os

os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np
import pytest

from mlx_gdn.ops import gated_delta_rule, kernels  # noqa: E402
from reference import assert_close, gated_delta_reference, make_inputs, rms_rel
from kernel_checks import (check_grads, check_layout, check_output, check_pieces, check_pieces_bf16_products,
                           check_scans)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(kernels.backend() not in ("metal", "cuda"),
                                 reason="needs MLX with Metal or CUDA")]
NAMES = ("q", "k", "v", "g", "beta", "initial_state")
FP32_TOL = 2e-5


def to_mx(data, dtype=mx.float32):
    return {n: mx.array(x) if n == "initial_state" else mx.array(x).astype(dtype)
            for n, x in data.items()}


@pytest.mark.parametrize("B,T,H,HV,D,cu", [(2, 300, 2, 4, 128, None), (1, 500, 4, 8, 100, None),
                                           (1, 1000, 2, 2, 64, [0, 15, 100, 300, 1000])])
def test_chunk_with_kernels_matches_oracle(B, T, H, HV, D, cu):
    n_states = len(cu) - 1 if cu else B
    data = make_inputs(T, B, T, H, HV, D, mask_p=0.3, h0=True, n_states=n_states)
    ro, rs = gated_delta_reference(**data, cu_seqlens=cu)
    o, s = gated_delta_rule(**to_mx(data), output_final_state=True, mode="chunk",
                            cu_seqlens=None if cu is None else mx.array(cu))
    assert rms_rel(ro, np.array(o)) <= FP32_TOL and rms_rel(rs, np.array(s)) <= FP32_TOL


@pytest.mark.parametrize("scan", ["mma", "simt", "resident", "resident-bf16"])
@pytest.mark.parametrize("N,HV,K,V,segments", [(40, 4, 128, 128, None), (12, 3, 200, 400, None),
                                               (9, 2, 100, 60, ((0, 3), (3, 9))),
                                               (9, 2, 96, 48, ((0, 3), (3, 9)))])
def test_scan_kernels_match_ops_scans(monkeypatch, scan, N, HV, K, V, segments):
    # resident-bf16: bfloat16 factors (tensor cores on CUDA), at a tolerance to match
    monkeypatch.setattr(kernels, "SCAN_KERNEL", scan.split("-")[0])
    bf16 = scan.endswith("bf16")
    check_scans(N, 1, HV, 64, K, V, segments, 1e-2 if bf16 else FP32_TOL, bf16_products=bf16)


@pytest.mark.parametrize("M,C,K,V", [(64, 64, 128, 128), (27, 64, 200, 400), (18, 32, 100, 60),
                                     (10, 16, 64, 32)])
def test_chunk_pieces_kernel_matches_ops(M, C, K, V):
    check_pieces(M, C, K, V, FP32_TOL)


@pytest.mark.parametrize("M,C,K,V", [(64, 64, 128, 128), (27, 64, 200, 400), (18, 32, 100, 60)])
def test_chunk_pieces_with_bf16_products(M, C, K, V):
    check_pieces_bf16_products(M, C, K, V, FP32_TOL)


@pytest.mark.parametrize("products", ["float", "bf16"])
@pytest.mark.parametrize("M,C,K,V,dtype", [(64, 64, 128, 128, "bfloat16"), (18, 32, 96, 48, "float32"),
                                           (10, 16, 64, 32, "bfloat16"),
                                           (16, 64, 128, 256, "bfloat16")])  # two threadgroups a chunk
def test_chunk_output_kernel_matches_ops(monkeypatch, products, M, C, K, V, dtype):
    # float: FP64 tensor cores (exact products); bf16: factors rounded to bfloat16, as the op runs
    # it for bfloat16 inputs
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")
    bf16 = products == "bf16"
    tol = 1e-2 if bf16 else (FP32_TOL if dtype == "float32" else 4e-3)
    check_output(M, C, K, V, getattr(mx, dtype), bf16, tol)


@pytest.mark.parametrize("M,C,K,V", [(64, 64, 128, 128), (27, 64, 200, 400), (18, 32, 100, 60)])
def test_chunk_grads_kernel_matches_ops(M, C, K, V):
    check_grads(M, C, K, V, FP32_TOL)


@pytest.mark.parametrize("B,T,H,HV,D,C,cu,l2norm,dtype", [
    (4, 1000, 4, 8, 128, 64, None, True, mx.bfloat16), (1, 777, 2, 2, 200, 64, [0, 100, 777], True, mx.float32),
    (2, 300, 2, 2, 400, 32, None, False, mx.float16)])
def test_layout_kernels_match_ops(B, T, H, HV, D, C, cu, l2norm, dtype):
    check_layout(B, T, H, HV, D, C, cu, l2norm, dtype, FP32_TOL)


@pytest.mark.parametrize("bf16", [False, True])
def test_simdgroup_matrix_prelude(bf16):
    # the 8x8 products of the prelude (CUDA: FP64 tensor cores, or BF16 ones) from padded
    # threadgroup rows; a product as a left factor; transposed loads and stores
    body = """
    threadgroup float a_s[8 * 12];
    threadgroup float b_s[8 * 24];
    const uint tid = thread_position_in_threadgroup.x;
    for (uint e = tid; e < 64; e += 32) { a_s[e / 8 * 12 + e % 8] = x[e]; b_s[e / 8 * 24 + e % 8] = y[e]; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 a, b, c;
    simdgroup_load(a, &a_s[0], 12);
    simdgroup_load(b, &b_s[0], 24);
    simdgroup_load(c, &b_s[0], 24);
    simdgroup_multiply_accumulate(c, a, b, c);
    simdgroup_multiply_accumulate(c, a, b, c);
    simdgroup_float8x8 d = make_filled_simdgroup_matrix<float, 8, 8>(0.0f), d2 = d, at;
    simdgroup_load_transposed(at, &a_s[0], 12);
    simdgroup_multiply_accumulate_pair(d, d2, c, b, at);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_store(c, &b_s[0], 24);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = tid; e < 64; e += 32) { out[e] = b_s[e / 8 * 24 + e % 8]; }
    simdgroup_store_transposed(d, &cat[0], 8);
    simdgroup_store(d2, &cat[64], 8);
    """
    import metal_kernels
    factory = mx.fast.cuda_kernel if kernels.backend() == "cuda" else mx.fast.metal_kernel
    bf16 = bf16 and kernels.backend() == "cuda"  # Metal multiplies float matrices in float
    header = (kernels.BF16_PRODUCTS if bf16 else "") + metal_kernels.prelude(kernels.backend())
    kern = factory(name=kernels.text_named("simdgroup_probe", header), input_names=["x", "y"],
                   output_names=["out", "cat"], source=body, header=header)
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    out, cat = kern(inputs=[mx.array(x), mx.array(y)], output_shapes=[(8, 8), (128,)],
                    output_dtypes=[mx.float32] * 2, grid=(32, 1, 1), threadgroup=(32, 1, 1))
    # the factors as the mode rounds them (exact products of those, float sums)
    f = (lambda a: np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32), np.float64)) if bf16 \
        else (lambda a: np.asarray(a, np.float64))
    c = y + 2 * (f(x) @ f(y))
    np.testing.assert_allclose(np.array(out), c, rtol=1e-5, atol=1e-5)
    cat = np.array(cat)
    np.testing.assert_allclose(cat[:64].reshape(8, 8), (f(c.astype(np.float32)) @ f(x).T).T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cat[64:].reshape(8, 8), f(y) @ f(x).T, rtol=1e-5, atol=1e-5)


def grads(data, dtype=mx.float32, **kw):
    w = mx.array(np.random.default_rng(0).standard_normal(data["v"].shape).astype(np.float32))

    def loss(*xs):
        o, s = gated_delta_rule(**dict(zip(NAMES, xs)), output_final_state=True, **kw)
        return (o.astype(mx.float32) * w).sum() + s.sum()

    arrays = to_mx(data, dtype)
    return [np.array(gr.astype(mx.float32))
            for gr in mx.grad(loss, argnums=list(range(6)))(*[arrays[n] for n in NAMES])]


@pytest.mark.parametrize("keep", [False, True])
def test_chunk_grads_with_kernels_match_ops_path(keep):
    data = make_inputs(2, 1, 400, 2, 4, 128, mask_p=0.3, h0=True)
    got = grads(data, mode="chunk", keep_chunk_pieces=keep)
    with kernels.use_factory("ops", None):
        ref = grads(data, mode="chunk")
    for n, a, b in zip(NAMES, ref, got):
        assert rms_rel(a, b) <= FP32_TOL, n


def test_compiled_training_step_with_kernels_matches_ops_path():
    # train.py's compiled step (kernels, fused chains) against value_and_grad op by op on the ops path
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_gdn.models import Model, ModelArgs, PRESETS
    from mlx_gdn.train import compiled_value_and_grad, loss_fn
    mx.random.seed(7)
    model = Model(ModelArgs(**PRESETS["small-gdn"]))
    ids = mx.array(np.random.default_rng(7).integers(0, 2048, (2, 301)))
    args = (ids[:, :-1], ids[:, 1:], mx.ones((2, 300)))
    loss, got = compiled_value_and_grad(model)(*args)
    with kernels.use_factory("ops", None):
        want_loss, want = nn.value_and_grad(model, loss_fn)(model, *args)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    want = dict(tree_flatten(want))
    for name, g in tree_flatten(got):
        assert rms_rel(np.array(want[name]), np.array(g)) <= 1e-4, name


@pytest.mark.parametrize("scan", ["auto", "resident"])
def test_bf16_grads_at_fla_tolerances(monkeypatch, scan):
    # resident: the resident scan, with bfloat16 products for these bfloat16 inputs (fla's precision)
    monkeypatch.setattr(kernels, "SCAN_KERNEL", scan)
    data = make_inputs(3, 1, 300, 2, 4, 128, mask_p=0.3, h0=True)
    rounded = {n: (x if n == "initial_state" else np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32)))
               for n, x in data.items()}
    ref = grads(rounded, mode="recurrent")
    got = grads(data, mx.bfloat16, mode="chunk")
    for n, a, b in zip(NAMES, ref, got):
        assert_close(n, a, b, 2e-2 if n in ("g", "beta") else 8e-3)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_decode_kernel_matches_oracle(dtype):
    rng = np.random.default_rng(5)
    data = make_inputs(5, 16, 2, 4, 16, 128, h0=True, unit_k=False)
    data["g"] = rng.standard_normal(data["g"].shape).astype(np.float32)
    opts = dict(A_log=np.log(rng.uniform(1, 16, 16)).astype(np.float32),
                dt_bias=rng.standard_normal(16).astype(np.float32))
    flags = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    rounded = {n: (x if n == "initial_state" else np.array(mx.array(x).astype(dtype).astype(mx.float32)))
               for n, x in data.items()}
    ro, rs = gated_delta_reference(**rounded, **opts, **flags)
    o, s = gated_delta_rule(**to_mx(data, dtype), output_final_state=True, mode="recurrent",
                            **{n: mx.array(x) for n, x in opts.items()}, **flags)
    tol = FP32_TOL if dtype == mx.float32 else 5e-3
    assert_close("o", ro, np.array(o.astype(mx.float32)), tol)
    assert_close("state", rs, np.array(s), tol)


# ---- fla 0.6.0 on the same inputs (skipped where fla or CUDA torch is missing) ----

def _fla():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    ops = pytest.importorskip("fla.ops.gated_delta_rule")
    return torch, ops


def test_forward_reads_inputs_viewed_at_an_odd_offset():
    # q, k, v as row-contiguous views one element into their buffers (not 16-byte aligned): the
    # kernels' 8-element loads of them (rows_to_chunks; chunk_pieces reads v from its token rows)
    # take the prelude's scalar path there, and the output must be the same as from fresh arrays
    data = make_inputs(9, 2, 300, 2, 4, 128, mask_p=0.2, h0=True, unit_k=False)  # its h0 unused
    xs = to_mx(data, mx.bfloat16)

    def odd_view(x):
        flat = mx.concatenate([mx.zeros((1,), dtype=x.dtype), x.reshape(-1)])
        return flat[1:].reshape(x.shape)

    views = {n: odd_view(xs[n]) for n in ("q", "k", "v")}
    mx.eval(views)
    run = lambda q, k, v: gated_delta_rule(q, k, v, xs["g"], xs["beta"], use_qk_l2norm_in_kernel=True,
                                           mode="chunk")[0].astype(mx.float32)
    fresh, viewed = run(xs["q"], xs["k"], xs["v"]), run(views["q"], views["k"], views["v"])
    assert np.array_equal(np.array(fresh), np.array(viewed))


@pytest.mark.parametrize("dtype,scan,wu", [("float32", "auto", "kernel"), ("bfloat16", "auto", "kernel"),
                                           ("bfloat16", "resident", "kernel"), ("bfloat16", "auto", "gemm")])
def test_forward_matches_fla_chunk(monkeypatch, dtype, scan, wu):
    # wu: the chunk pieces' W and U in the kernel, or as bfloat16 GEMMs (kernels.PIECES_WU)
    torch, fla_ops = _fla()
    monkeypatch.setattr(kernels, "SCAN_KERNEL", scan)
    monkeypatch.setattr(kernels, "PIECES_WU", wu)
    data = make_inputs(7, 2, 1000, 4, 8, 128, mask_p=0.2, h0=True, unit_k=False)
    tdt = getattr(torch, dtype)
    t = {n: torch.tensor(x, device="cuda") for n, x in data.items()}
    o_fla, s_fla = fla_ops.chunk_gated_delta_rule(
        t["q"].to(tdt), t["k"].to(tdt), t["v"].to(tdt), t["g"], t["beta"].to(tdt),
        initial_state=t["initial_state"], output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = gated_delta_rule(**to_mx(data, getattr(mx, dtype)), output_final_state=True,
                            use_qk_l2norm_in_kernel=True, mode="chunk")
    o_fla = o_fla.float().cpu().numpy()
    s_fla = s_fla.float().cpu().numpy()
    # fla's chunk path computes in TF32 (~1e-3, SPEC §6); bf16 at fla's own tolerance
    tol = 3e-3 if dtype == "float32" else 5e-3
    assert_close("o", o_fla, np.array(o.astype(mx.float32)), tol)
    assert_close("state", s_fla, np.array(s), tol)


def test_decode_matches_fla_fused_recurrent():
    torch, fla_ops = _fla()
    data = make_inputs(8, 16, 1, 16, 16, 128, h0=True, unit_k=False)
    t = {n: torch.tensor(x, device="cuda") for n, x in data.items()}
    # by keyword: fla 0.6.0's fused_recurrent has more gate arguments (gk, gv) after g
    o_fla, s_fla = fla_ops.fused_recurrent_gated_delta_rule(
        t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"], initial_state=t["initial_state"],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, s = gated_delta_rule(**to_mx(data), output_final_state=True, use_qk_l2norm_in_kernel=True,
                            mode="recurrent")
    assert rms_rel(o_fla.cpu().numpy(), np.array(o)) <= 1e-5
    assert rms_rel(s_fla.cpu().numpy(), np.array(s)) <= 1e-5


def test_to_hf_checkpoint_loads_in_fla_with_the_same_logits(tmp_path):
    # an MLX-side model (GVA, LoRA adapters fused on the way out) exported with --to-hf, loaded by
    # fla's from_pretrained; fla's layer takes its fused_recurrent path at T = 32 (float32-exact)
    torch, _ = _fla()
    from fla.models import GatedDeltaNetForCausalLM
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_gdn.convert import to_hf
    from mlx_gdn.lora import LoraConfig, apply_lora
    from mlx_gdn.models import Model, ModelArgs, save_model

    mx.random.seed(11)
    model = Model(ModelArgs(vocab_size=128, hidden_size=64, num_hidden_layers=2, head_dim=16, num_heads=2,
                            num_v_heads=4, hidden_ratio=2, norm_eps=1e-6))
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.15) for k, v in
                                 tree_flatten(model.parameters()) if not k.endswith(("A_log", "dt_bias", "norm.weight"))]))
    apply_lora(model, LoraConfig(rank=4))
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.1)
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    ids = np.random.default_rng(0).integers(0, 128, (2, 32))
    ours = np.array(model(mx.array(ids)))
    save_model(model, tmp_path / "mlx")
    to_hf(tmp_path / "mlx", tmp_path / "hf")
    fla_model = GatedDeltaNetForCausalLM.from_pretrained(str(tmp_path / "hf")).cuda().float().eval()
    with torch.no_grad():
        theirs = fla_model(torch.tensor(ids).cuda()).logits.float().cpu().numpy()
    assert rms_rel(theirs, ours) <= 1e-4
