"""Every CPU benchmark script runs end to end on tiny settings (their numbers are not checked here:
benchmarks print ratios; this only keeps the scripts in step with the library)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "bench_ops.py": ["--seq-lens", "64", "--heads", "2", "--head-dim", "16", "--quick"],
    "bench_model.py": ["--presets", "tiny-gdn", "--prefill", "64", "--decode-steps", "2", "--contexts", "128",
                       "--piece", "64"],
    "bench_train.py": ["--preset", "tiny-gdn", "--seq-lens", "64", "--builtin", "--checkpoint", "both",
                       "--repeats", "1"],
    "bench_generate.py": ["--models", "tiny-gdn", "--dtype", "float32", "--prompt-tokens", "16",
                          "--new-tokens", "3"],
    "bench_model_gpu.py": ["--presets", "tiny-gdn", "--seq-len", "64", "--prompt", "8", "--new-tokens", "3",
                           "--gen-batch", "2", "--no-fla", "--rounds", "2", "--keep-chunk-pieces"],
    # on the CPU: the decode rows only (the op's shapes are GPU-sized), fla absent
    "bench_gpu.py": ["--shapes", "none", "--rounds", "1"],
    "ab_settings.py": ["--variant", "f32", "FACTORS_IN_BF16=0", "QK_IN_BF16=0", "--variant", "shipped",
                       "--shapes", "1,64,2", "--rounds", "1"],
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_script_runs(script, tmp_path):
    args = RUNS[script] + ["--out", str(tmp_path / "out.json")]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit, no GPU)")
def test_cuda_resource_usage_compiles_every_chunk_kernel():
    # the CUDA prelude plus each chunk and layout kernel body compiles for sm_90 as mx.fast.cuda_kernel would
    # (and with bfloat16 buffers where the op passes q, k, v in bfloat16, and where the forward's
    # intermediates are bfloat16: kernels.forward_types)
    bf16 = "__nv_bfloat16"
    rows = "src:int32_t dims:int32_t"
    cases = [("chunk_pieces", "K=100 V=60 C=64 THREADS=256 KC=32 CS=68 TS=68 ALL_PIECES=true WT=float PT=float "
                              f"V_ROWS=false HV=1 {rows} WU=true TT=float MMA=false QInT=float KInT=float VInT=float"),
             ("chunk_pieces", f"K=128 V=128 C=64 THREADS=256 KC=32 CS=68 TS=68 ALL_PIECES=false "
                              f"q:{bf16} k:{bf16} v:{bf16} WT={bf16} PT={bf16} W:{bf16} P:{bf16} "
                              f"V_ROWS=true HV=32 {rows} WU=true TT=float MMA=true BF16_PRODUCTS=true "
                              f"QInT={bf16} KInT={bf16} VInT={bf16}"),
             ("chunk_pieces", f"K=128 V=128 C=64 THREADS=256 KC=32 CS=68 TS=68 ALL_PIECES=false "
                              f"q:{bf16} k:{bf16} v:{bf16} WT=float PT={bf16} P:{bf16} T:{bf16} "
                              f"V_ROWS=false HV=1 {rows} WU=false TT={bf16} MMA=false "
                              f"QInT={bf16} KInT={bf16} VInT={bf16}"),
             ("chunk_scan_mma", "K=128 V=128 C=64 THREADS=512 BV=16 CB=32 KS=4 REVERSE=true "
                                f"HAS_Y=true AST=132 BST=36 HST=24 A:{bf16} StateT=float"),
             ("chunk_scan", f"K=200 V=400 C=64 THREADS=256 BV=16 CB=16 REVERSE=false HAS_Y=false StateT={bf16} "
                            f"states:{bf16} x_new:{bf16} AT={bf16} BT={bf16} XT={bf16} A:{bf16} Bm:{bf16} X:{bf16}"),
             ("chunk_scan", f"K=128 V=128 C=64 THREADS=256 BV=32 CB=16 REVERSE=true HAS_Y=true A:{bf16} "
                            f"StateT=float AT={bf16} BT=float XT=float"),
             ("chunk_scan_resident", "K=128 V=128 C=64 THREADS=256 CB=32 AST=136 BST=132 REVERSE=true "
                                     f"HAS_Y=true A:{bf16} AT={bf16} BT=float StateT=float"),
             ("chunk_scan_resident", "K=128 V=128 C=64 THREADS=256 CB=32 AST=136 BST=132 REVERSE=false "
                                     f"HAS_Y=false Bm:{bf16} A:{bf16} AT={bf16} BT={bf16} BF16_PRODUCTS=true "
                                     f"StateT={bf16} states:{bf16} x_new:{bf16}"),
             ("chunk_output", "K=104 V=48 BV=48 C=64 THREADS=96 OutT=float QT=float ST=float PT=float KS=32 "
                              f"SST=52 QST=36 OST=52 PST=68 ROWS=false HV=1 {rows}"),
             ("chunk_output", f"K=128 V=256 BV=128 C=64 THREADS=256 OutT={bf16} QT={bf16} ST={bf16} PT={bf16} "
                              f"o:{bf16} P:{bf16} q:{bf16} "
                              f"states:{bf16} u:{bf16} BF16_PRODUCTS=true KS=32 SST=132 QST=36 OST=132 PST=68 "
                              f"ROWS=true HV=32 {rows}"),
             ("chunk_grads", f"K=100 V=60 C=64 THREADS=256 KC=16 CS=68 TS=68 k:{bf16} v:{bf16} u:{bf16}"),
             ("rows_to_chunks", "InT=float OutT=float D=100 HX=2 HV=4 C=64 L2NORM=true RPS=4"),
             ("rows_to_chunks", f"InT={bf16} OutT={bf16} x:{bf16} y:{bf16} D=128 HX=2 HV=4 C=64 L2NORM=true "
                                "RPS=4"),
             ("chunks_to_rows", "OutT=float XT=float D=100 HX=2 HV=4 C=64 L2NORM=true"),
             ("chunks_to_rows", f"OutT={bf16} XT={bf16} y:{bf16} out:{bf16} D=128 HX=2 HV=4 C=64 L2NORM=false")]
    for name, template in cases:
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_resource_usage.py"), name,
                              *template.split()], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "registers" in run.stdout, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit, no GPU)")
def test_cuda_launch_bounds_cap_the_registers():
    # the header kernels.launch_bounds writes must reach ptxas: 3 threadgroups of 256 threads an SM
    # leave at most 65536 / 768 = 85 registers a thread (without bounds chunk_grads takes 128)
    args = "K=128 V=128 C=64 THREADS=256 KC=16 CS=68 TS=68".split()
    used = {}
    for blocks in (0, 3):
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_resource_usage.py"),
                              "chunk_grads", *args, f"MIN_THREADGROUPS={blocks}"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        used[blocks] = int(run.stdout.split("Used ")[1].split(" registers")[0])
    assert used[3] <= 85 < used[0]


def test_ab_kernels_times_each_text_on_its_own(tmp_path):
    # through the emulator, tiny: a copy of the shipped scan matches it, a changed one does not
    body = (ROOT / "metal_kernels" / "chunk_scan.metal").read_text()
    update = "h[i][a][j] += br[a] * xr[j];"
    assert update in body
    (tmp_path / "copy.metal").write_text(body + "\n// a copy\n")
    (tmp_path / "half.metal").write_text(body.replace(update, "h[i][a][j] += 0.5f * br[a] * xr[j];"))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = ["chunk_scan", "--body", "copy.metal", "half.metal", "--shapes", "1,128,1,16x16", "--rounds", "1",
            "--runs", "1", "--emulate", "--out", "out.json"]
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_kernels.py"), *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    diffs = {r["variant"]: r["max_abs_diff_vs_shipped"] for r in rows}
    assert diffs["body:copy.metal"] == 0.0 and diffs["body:half.metal"] > 1e-3


def test_ab_settings_swaps_bodies_and_merges_dict_settings(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ab_settings
    import metal_kernels
    from mlx_gdn.ops import kernels
    (tmp_path / "v.metal").write_text("// a variant body\n")
    name, text = ab_settings.parse_setting(f"body:chunk_output={tmp_path / 'v.metal'}")
    assert (name, text) == ("body:chunk_output", "// a variant body\n")
    name, bounds = ab_settings.parse_setting("CUDA_MIN_THREADGROUPS=chunk_pieces:3")
    assert bounds == {**kernels.CUDA_MIN_THREADGROUPS, "chunk_pieces": 3}
    shipped_bounds, shipped_text = kernels.CUDA_MIN_THREADGROUPS, metal_kernels.source("chunk_output")
    try:
        ab_settings.apply({"body:chunk_output": text, name: bounds})
        assert metal_kernels.source("chunk_output") == text
        assert metal_kernels.source("chunk_pieces") != text and kernels.CUDA_MIN_THREADGROUPS["chunk_pieces"] == 3
        ab_settings.apply({name: shipped_bounds})  # a variant without the body: the shipped one
        assert metal_kernels.source("chunk_output") == shipped_text
    finally:
        kernels.CUDA_MIN_THREADGROUPS = shipped_bounds
        metal_kernels.source = ab_settings._source


@pytest.mark.parametrize("T,window", [(37, 8), (40, 64), (33, -1)])
def test_sdpa_stand_in_for_flash_attn_matches_a_windowed_softmax(T, window):
    # bench_model_gpu.py runs fla's hybrids with this in place of flash-attn: it must attend to each
    # token and the `window - 1` before it (flash-attn's window_size=(window - 1, 0)), with GQA
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sdpa_attention import flash_attn_func

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, T, heads, 8)) for heads in (4, 2, 2))
    left = window - 1 if window > 0 else -1
    out = flash_attn_func(*(torch.tensor(x, dtype=torch.float32) for x in (q, k, v)), causal=True,
                          window_size=(left, 0)).double().numpy()
    kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # query head h reads kv head h // 2
    scores = np.einsum("bihd,bjhd->bhij", q, kr) / np.sqrt(8)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    scores = np.where((j <= i) & ((left < 0) | (j >= i - left)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhij,bjhd->bihd", weights / weights.sum(-1, keepdims=True), vr)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit, no GPU)")
def test_cuda_resource_usage_counts_the_resident_scans_products():
    # --sass: the forward resident scan's chunk, fully unrolled, has K/8 x C/8 16x8x8 products for
    # x = X - A h (each 8-row tile of the chunk times each 8-row block of h^T), C/8 for x' = x tail,
    # K/8 for decay h and K/8 x C/8 for the update: 128 + 8 + 16 + 128 at K = 128, C = 64; no spills
    import cuda_resource_usage
    if cuda_resource_usage._nvdisasm() is None:
        pytest.skip("needs nvdisasm (pip install nvidia-cuda-nvdisasm)")
    bf16 = "__nv_bfloat16"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cuda_resource_usage.py"), "--sass",
                          "chunk_scan_resident", *f"K=128 V=128 C=64 THREADS=256 CB=32 AST=136 BST=132 "
                          f"REVERSE=false HAS_Y=false Bm:{bf16} A:{bf16} AT={bf16} BT={bf16} X:{bf16} "
                          f"BF16_PRODUCTS=true StateT={bf16} states:{bf16} x_new:{bf16}".split()],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    counts = dict(item.split() for item in run.stdout.split("SASS instructions:")[1].split(", "))
    assert int(counts["HMMA"]) == 280 and "0 bytes spill stores" in run.stdout, run.stdout
