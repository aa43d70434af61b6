"""The Metal runner's kernel sources, as mx.fast.metal_kernel would compile them, checked by clang
against a stand-in for the Metal standard library (tests/emulator/metal_source.py): the op, forward and
backward, the decode step and the embedded model run with backend "metal" (Metal's launch choices:
32 KB threadgroups, float products and intermediates), every launch's source checked, then run on the
emulator and compared with the MLX-ops path. No Mac here: this is the closest check of the Metal path
short of running it."""

import mlx.core as mx
import numpy as np
import pytest

import metal_kernels
import mlx_gdn
from emulator.metal_source import MetalCheckedKernel, checked, clang_errors, kernel_source, launched
from mlx_gdn.generate import DEFAULT_MODEL
from mlx_gdn.ops import chunk, gated_delta_rule, kernels
from reference import make_inputs, rms_rel


# name: (B, T, H, HV, K, V, input dtype, op options, kernels.py settings)
CASES = {
    "simt scan, float32, state": (1, 40, 1, 2, 32, 32, mx.float32, {}, dict(SCAN_KERNEL="simt")),
    "8x8 scan, bf16, gates in kernel": (1, 40, 2, 2, 32, 32, mx.bfloat16,
                                        dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                             use_beta_sigmoid_in_kernel=True), dict(SCAN_KERNEL="mma")),
    "resident scan, fp16, varlen": (1, 50, 1, 1, 32, 32, mx.float16,
                                    dict(cu_seqlens=[0, 7, 50], use_qk_l2norm_in_kernel=True),
                                    dict(SCAN_KERNEL="resident")),
    "8x8 scan at chunks of 64": (1, 70, 1, 1, 64, 128, mx.float32, dict(chunk_size=64),
                                 dict(SCAN_KERNEL="mma")),
    "resident scan at chunks of 64": (1, 70, 1, 1, 64, 128, mx.float32, dict(chunk_size=64),
                                      dict(SCAN_KERNEL="resident")),
    "K, V not multiples of 8": (1, 30, 1, 1, 60, 100, mx.float32, dict(use_qk_l2norm_in_kernel=True), {}),
    # the op's default chunk size, where Metal's 32 KB binds (the C x C arrays fill it)
    "chunks of 64, bf16, K = 64, V = 128": (1, 80, 1, 2, 64, 128, mx.bfloat16,
                                            dict(use_qk_l2norm_in_kernel=True, chunk_size=64), {}),
    # as train.py runs the embedded model: packed sequences, the forward's pieces kept for the backward
    "training: packed, kept pieces": (1, 90, 1, 2, 64, 128, mx.bfloat16,
                                      dict(cu_seqlens=[0, 20, 90], use_qk_l2norm_in_kernel=True, chunk_size=64,
                                           keep_chunk_pieces=True), {}),
    # the head sizes of the 0.4B and 1.3B presets (K = 128, V = 256; K = 200, V = 400)
    "gdn-0.4b heads": (1, 70, 1, 1, 128, 256, mx.bfloat16, dict(use_qk_l2norm_in_kernel=True, chunk_size=64), {}),
    "gdn-1.3b heads": (1, 70, 1, 1, 200, 400, mx.bfloat16, dict(use_qk_l2norm_in_kernel=True, chunk_size=64), {}),
}


@pytest.fixture
def metal(monkeypatch):
    monkeypatch.setattr(chunk, "COMPILE", False)  # the emulator runs each launch at once: no tracing
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")
    with kernels.use_factory("metal", MetalCheckedKernel):
        yield


def _inputs(B, T, H, HV, K, V, dtype, opts):
    data = make_inputs(K + T, B, T, H, HV, K, V, mask_p=0.2, h0=True,
                       unit_k=not opts.get("use_qk_l2norm_in_kernel"))
    rng = np.random.default_rng(T)
    kw = {n: (mx.array(x) if n == "cu_seqlens" else x) for n, x in opts.items()}
    if opts.get("use_gate_in_kernel"):
        data["g"] = rng.standard_normal(data["g"].shape).astype(np.float32)
        kw["A_log"] = mx.array(np.log(rng.uniform(1, 16, HV)).astype(np.float32))
        kw["dt_bias"] = mx.array(rng.standard_normal(HV).astype(np.float32))
    if opts.get("use_beta_sigmoid_in_kernel"):
        data["beta"] = rng.standard_normal(data["beta"].shape).astype(np.float32)
    if "cu_seqlens" in opts:
        data["initial_state"] = np.repeat(data["initial_state"], len(opts["cu_seqlens"]) - 1, axis=0)
    xs = [mx.array(data[n]).astype(dtype) for n in ("q", "k", "v")]
    xs += [mx.array(data[n]) for n in ("g", "beta", "initial_state")]
    return xs, kw


@pytest.mark.parametrize("case", CASES)
def test_metal_sources_of_the_op_compile_and_match_ops(metal, monkeypatch, case):
    B, T, H, HV, K, V, dtype, opts, settings = CASES[case]
    for name, value in settings.items():
        monkeypatch.setattr(kernels, name, value)
    xs, kw = _inputs(B, T, H, HV, K, V, dtype, opts)
    w = mx.array(np.random.default_rng(3).standard_normal((B, T, HV, V)).astype(np.float32))

    def run():
        def loss(*a):
            o, s = gated_delta_rule(*a[:5], initial_state=a[5], mode="chunk", output_final_state=True,
                                    **{"chunk_size": 16, **kw})
            return (o.astype(mx.float32) * w).sum() + s.sum(), o, s
        (_, o, s), grads = mx.value_and_grad(loss, argnums=list(range(6)))(*xs)  # grads of the first
        return [o, s] + list(grads)

    start = len(launched)
    got = run()
    assert {"chunk_pieces", "chunk_grads"} <= set(launched[start:]), "the kernels did not run"
    with kernels.use_factory("ops", None):
        ref = run()
    tol = 1e-4 if dtype == mx.float32 else 2e-2
    for i, (a, b) in enumerate(zip(ref, got)):
        assert rms_rel(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))) <= tol, i


@pytest.mark.parametrize("dtype,K,V", [(mx.float32, 32, 32), (mx.bfloat16, 32, 32), (mx.bfloat16, 200, 400)])
def test_metal_source_of_the_decode_step_compiles_and_matches_ops(metal, dtype, K, V):
    # 2 heads: A_log and dt_bias under 8 elements, which MLX passes in Metal's constant address space
    xs, kw = _inputs(1, 1, 1, 2, K, V, dtype, dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                                                   use_qk_l2norm_in_kernel=True))
    run = lambda: gated_delta_rule(*xs[:5], initial_state=xs[5], mode="recurrent", output_final_state=True, **kw)
    start = len(launched)
    got = run()
    assert launched[start:] == ["decode_step"]
    with kernels.use_factory("ops", None):
        ref = run()
    for a, b in zip(ref, got):
        assert rms_rel(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))) <= 1e-2


def test_metal_sources_of_the_default_model_match_ops(metal):
    # what a Mac user runs first, generate.py on the embedded model (K = 64, V = 128, two heads,
    # bfloat16): a prefill of over 16 tokens (the chunk kernels) and two decode steps, every Metal
    # source checked, the logits as on the MLX-ops path
    model, tokenizer = mlx_gdn.load(DEFAULT_MODEL)
    prompt, sample = (DEFAULT_MODEL / "SAMPLE.txt").read_text().split("\n---\n", 1)
    ids = mx.array([tokenizer.encode(prompt + sample)[:40]])

    def logits():
        cache = model.make_cache()
        out = [model(ids, cache=cache)[:, -1]]
        for _ in range(2):
            out.append(model(mx.argmax(out[-1], axis=-1)[:, None], cache=cache)[:, -1])
        return [x.astype(mx.float32) for x in out]

    start = len(launched)
    got = logits()
    assert set(launched[start:]) >= {"decode_step", "chunk_pieces", "chunk_scan"}
    with kernels.use_factory("ops", None):
        ref = logits()
    for a, b in zip(ref, got):
        assert rms_rel(np.array(a), np.array(b)) <= 1e-2


PROBE = dict(name="probe", input_names=["x", "small"], output_names=["out"],
             inputs=[mx.zeros((64,), mx.bfloat16), mx.zeros((4,), mx.float32)], output_dtypes=[mx.float32],
             template=[("T", mx.bfloat16), ("N", 8), ("FLAG", True)])


@pytest.mark.parametrize("body,error", [
    # a float matrix from bfloat16 memory: Metal's simdgroup_load takes the matrix's element type only
    ("simdgroup_float8x8 m; simdgroup_load(m, x, 8);", "no matching function for call to 'simdgroup_load'"),
    # an input under 8 elements is in the constant address space, not device
    ("gdn_vec8<float> v = gdn_load_vec8(small);", "no matching function for call to 'gdn_load_vec8'"),
    # device memory through a thread pointer
    ("float* p = out; p[0] = 1.0f;", "cannot initialize a variable of type 'float *'"),
    ("out[0] = gdn_undefined(x[0]);", "use of undeclared identifier 'gdn_undefined'"),
    ("double d = 1.0; out[0] = d;", "unknown type name 'metal_has_no_double'"),  # no double in Metal
    ("if constexpr (FLAG) { out[0] = 1.0f; }", "constexpr if is a C++17 extension"),  # MSL: C++14
    # 8 KB more than Metal's 32 KB of threadgroup memory with N = 8
    ("threadgroup float big[1024 * N];", "threadgroup memory over Metal's 32768 bytes"),
])
def test_metal_check_rejects_what_metal_rejects(body, error):
    ok = ("threadgroup float s[N];\nconst uint i = thread_position_in_grid.x;\n"
          "s[i % N] = static_cast<float>(x[i]) + small[0];\nthreadgroup_barrier(mem_flags::mem_threadgroup);\n"
          "if (FLAG) { out[i] = s[(i + 1) % N]; }\n")
    make = lambda b: kernel_source(PROBE["name"], PROBE["input_names"], PROBE["output_names"], b,
                                   metal_kernels.prelude("metal"), PROBE["inputs"], PROBE["output_dtypes"],
                                   PROBE["template"])
    assert clang_errors(make(ok)) == []
    errors = clang_errors(make(ok + body))
    assert errors and error in errors[0], errors


def test_metal_check_rejects_a_threadgroup_over_1024_threads():
    kernel = MetalCheckedKernel("probe", ["x"], ["out"], "out[thread_position_in_grid.x] = x[0];")
    x = mx.zeros((8,))
    launch = dict(inputs=[x], output_shapes=[(2048,)], output_dtypes=[mx.float32], grid=(2048, 1, 1))
    assert np.array_equal(np.array(kernel(**launch, threadgroup=(1024, 1, 1))[0]), np.zeros(2048))
    with pytest.raises(RuntimeError, match="a threadgroup of 2048 threads, over Metal's 1024"):
        kernel(**launch, threadgroup=(2048, 1, 1))


def test_every_kernel_source_was_checked():
    # runs last in this module: each .metal body's Metal source went through clang above
    names = {n.rsplit("_", 1)[0] for n in checked}
    assert set(metal_kernels.KERNELS) <= names, set(metal_kernels.KERNELS) - names
