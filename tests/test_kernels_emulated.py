"""Every kernel in metal_kernels/ executed by the CPU emulator (tests/emulator): each against the MLX-ops
path and the float64 oracle, then the whole op, and a whole tiny model's gradients, with the kernels
in place of the ops path."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import metal_kernels
from emulator import EmulatedKernel, executed
from mlx_gdn.models import Model, ModelArgs, PRESETS
from mlx_gdn.ops import chunk, gated_delta, gated_delta_rule, kernels
from mlx_gdn.train import loss_fn
from reference import assert_close, gated_delta_reference, make_inputs, rms_rel
from kernel_checks import (check_grads, check_layout, check_output, check_pieces, check_pieces_bf16_products,
                           check_scans)

FP32_TOL = 1e-5


@pytest.fixture
def emulated():
    with kernels.use_factory("emulated", EmulatedKernel):
        yield


SCAN_CASES = [
    # N, B, HV, C, K, V, segments (None: one per batch row), value tile or (tile, threads[, bytes])
    (3, 2, 2, 16, 32, 32, None, 16),        # 128 threads, 16 tiles of A h: the k sum split 8 ways
    (4, 1, 3, 16, 60, 100, None, 16),       # D not a multiple of 32, V not a multiple of the tile
    (5, 1, 2, 32, 64, 48, ((0, 1), (1, 4), (4, 5)), 16),  # varlen: three segments
    (2, 1, 1, 64, 128, 40, None, 32),       # the GPU shape's K and C; tile wider than V's rest
    (2, 1, 1, 64, 200, 24, None, 16),       # two row groups of 4 a thread in the update (K = 200)
    (2, 1, 2, 32, 30, 18, None, (8, 128)),  # K and V not multiples of 4: a padded row group
    (3, 1, 2, 64, 128, 40, None, (8, 512)),  # more threads than row groups (idle in the update)
    (3, 2, 1, 16, 60, 20, ((0, 2), (2, 3)), (8, 256)),  # a K that the splits do not divide; varlen
    (2, 1, 2, 64, 128, 40, None, (16, 256, 49152)),  # the CUDA default: 48 KB stages (32 rows)
    (2, 1, 1, 64, 200, 40, None, (16, 256, 49152)),  # the CUDA default at the 1.3B K (16-row stages)
    (3, 1, 2, 48, 64, 40, None, (16, 256, 49152)),  # C = 48: 12 row groups a stage, not a power of 2
]

MMA_SCAN_CASES = [
    # N, B, HV, C, K, V, segments, (value tile, threads, threadgroup bytes, padded strides)
    (3, 2, 2, 16, 32, 32, None, (16, 256, 32768, False)),   # 4 tiles of A h, its k sum split 4 ways
    (4, 1, 3, 16, 60, 100, None, (16, 128, 32768, False)),  # K not a multiple of 8, V of the tile
    (5, 1, 2, 32, 64, 48, ((0, 1), (1, 4), (4, 5)), (16, 256, 32768, True)),  # varlen
    (2, 1, 1, 64, 128, 40, None, (32, 256, 32768, False)),  # 4 stages of 16 rows (Metal's 32 KB)
    (2, 1, 2, 64, 128, 40, None, (16, 256, 49152, True)),   # the CUDA default: 2 stages, padded
    (2, 1, 1, 64, 200, 24, None, (16, 256, 49152, True)),   # the 1.3B head size: 4 stages
    (3, 2, 1, 16, 100, 20, ((0, 2), (2, 3)), (8, 64, 49152, True)),  # two SIMD groups, 7 tiles each
]


@pytest.mark.parametrize("N,B,HV,C,K,V,segments,tile", SCAN_CASES)
def test_scan_kernels_match_ops(emulated, monkeypatch, N, B, HV, C, K, V, segments, tile):
    tile, threads, limit = tile + (32768,) * (3 - len(tile)) if isinstance(tile, tuple) else (tile, 128, 32768)
    monkeypatch.setattr(kernels, "SCAN_KERNEL", "simt")
    monkeypatch.setattr(kernels, "SCAN_TILE", tile)
    monkeypatch.setattr(kernels, "SCAN_THREADS", threads)
    monkeypatch.setitem(kernels.THREADGROUP_BYTES, "emulated", limit)
    check_scans(N, B, HV, C, K, V, segments)


def test_scan_widens_its_tile_past_one_wave(emulated, monkeypatch):
    # 2 x 2 rows x 5 tiles of 8 columns = 20 threadgroups > 6 resident: 16-column tiles instead
    widths = []
    scan_tiles = kernels._scan_tiles
    monkeypatch.setattr(kernels, "_scan_tiles", lambda *a: widths.append(a[-1]) or scan_tiles(*a))
    monkeypatch.setattr(kernels, "SCAN_KERNEL", "simt")
    monkeypatch.setattr(kernels, "SCAN_TILE", 8)
    monkeypatch.setattr(kernels, "SCAN_THREADS", 128)
    monkeypatch.setitem(kernels.SCAN_RESIDENT, "emulated", 6)
    check_scans(3, 2, 2, 16, 64, 40, None)
    assert widths and set(widths) == {16}


@pytest.mark.parametrize("N,B,HV,C,K,V,segments,config", MMA_SCAN_CASES)
def test_mma_scan_kernels_match_ops(emulated, monkeypatch, N, B, HV, C, K, V, segments, config):
    tile, threads, limit, padded = config
    monkeypatch.setattr(kernels, "SCAN_KERNEL", "mma")
    monkeypatch.setattr(kernels, "SCAN_TILE", tile)
    monkeypatch.setattr(kernels, "MMA_SCAN_THREADS", threads)
    monkeypatch.setitem(kernels.THREADGROUP_BYTES, "emulated", limit)
    monkeypatch.setitem(kernels.PADDED_STRIDES, "emulated", padded)
    check_scans(N, B, HV, C, K, V, segments)


RESIDENT_SCAN_CASES = [
    # N, B, HV, C, K, V, segments, (SIMD groups at most, threadgroup bytes, padded strides)
    (3, 2, 2, 16, 32, 32, None, (4, 32768, False)),    # two SIMD groups (V = 32), one stage a side
    (4, 1, 3, 16, 24, 48, None, (4, 32768, True)),     # K = 24; V = 48: three 16-column blocks, one group
    (5, 1, 2, 32, 64, 64, ((0, 1), (1, 4), (4, 5)), (4, 32768, True)),  # varlen, 4 SIMD groups
    (2, 1, 1, 64, 128, 64, None, (4, 49152, True)),    # the GPU shape's K and C: 2 stages of 32 rows
    (2, 1, 2, 64, 128, 16, None, (1, 32768, False)),   # one SIMD group: 8-row stages (registers)
    (3, 2, 1, 24, 40, 16, ((0, 2), (2, 3)), (2, 32768, False)),  # C = 24; varlen
]


def spy_kernels(monkeypatch):
    """The names of the kernels get_kernel hands out from now on, with their bf16_products."""
    used = []
    get_kernel = kernels.get_kernel
    monkeypatch.setattr(kernels, "get_kernel",
                        lambda name, *a: used.append((name, bool(a[1:] and a[1]))) or get_kernel(name, *a))
    return used


def resident_scan_config(monkeypatch, groups, limit, padded):
    """The resident scan forced, with its SIMD groups, threadgroup memory and padding for the emulator."""
    monkeypatch.setattr(kernels, "SCAN_KERNEL", "resident")
    monkeypatch.setattr(kernels, "RESIDENT_SCAN_GROUPS", {"forward": groups, "reverse": groups})
    monkeypatch.setitem(kernels.THREADGROUP_BYTES, "emulated", limit)
    monkeypatch.setitem(kernels.PADDED_STRIDES, "emulated", padded)


@pytest.mark.parametrize("N,B,HV,C,K,V,segments,config", RESIDENT_SCAN_CASES)
def test_resident_scan_kernels_match_ops(emulated, monkeypatch, N, B, HV, C, K, V, segments, config):
    resident_scan_config(monkeypatch, *config)
    used = spy_kernels(monkeypatch)
    check_scans(N, B, HV, C, K, V, segments)
    assert set(used) == {("chunk_scan_resident", False)}


@pytest.mark.parametrize("N,B,HV,C,K,V,segments,config", RESIDENT_SCAN_CASES[2:4])
def test_resident_scan_with_bf16_products(emulated, monkeypatch, N, B, HV, C, K, V, segments, config):
    # factors rounded to bfloat16 (GDN_MMA_BF16, as the CUDA prelude's BF16 tensor cores): ~3e-3
    resident_scan_config(monkeypatch, *config)
    used = spy_kernels(monkeypatch)
    check_scans(N, B, HV, C, K, V, segments, 1e-2, bf16_products=True)
    assert set(used) == {("chunk_scan_resident", True)}
    with pytest.raises(AssertionError):  # the rounding shows: not the float products
        check_scans(N, B, HV, C, K, V, segments, 1e-4, bf16_products=True)


def auto_bf16_on_emulator(monkeypatch):
    """The "auto" kernel choices as on CUDA for bf16 inputs, at the emulator's small shapes: BF16
    products, the resident scan from 4 SIMD groups in all, 2 a threadgroup (V = 32 fills one)."""
    monkeypatch.setattr(kernels, "BF16_PRODUCT_BACKENDS", {"emulated"})
    monkeypatch.setattr(kernels, "RESIDENT_MIN_GROUPS", 4)
    monkeypatch.setattr(kernels, "RESIDENT_SCAN_GROUPS", {"forward": 2, "reverse": 2})


@pytest.mark.parametrize("dtype,rows", [(mx.bfloat16, "one"), (mx.float32, "one"), (mx.bfloat16, "packed"),
                                        (mx.bfloat16, "blocks")])
def test_auto_kernels_take_bf16_products_for_bf16_inputs(emulated, monkeypatch, dtype, rows):
    # SCAN_KERNEL "auto": the resident scan with bfloat16 products for bfloat16 inputs where the
    # backend has them and the grid is large enough; the SIMT scan for other inputs. rows: one
    # sequence, packed sequences (the scans restart; the output kernel sees padding), or one
    # sequence in two forward blocks (the bf16 output joined with float32 arrays by _one_array)
    auto_bf16_on_emulator(monkeypatch)
    if rows == "blocks":
        monkeypatch.setattr(chunk, "REFERENCE_TOKEN_FLOATS", 0)
        monkeypatch.setattr(chunk, "KERNEL_BLOCK_SCALE", 1)
        monkeypatch.setattr(chunk, "BLOCK_TOKENS", 32)  # 2 chunks of 16 a block: blocks of 2 and 1
    cu = [0, 17, 40] if rows == "packed" else None
    used = spy_kernels(monkeypatch)
    data = make_inputs(0, 1, 40, 1, 2, 32, h0=True, n_states=2 if cu else None)
    ro, rs = gated_delta_reference(**data, cu_seqlens=cu)
    xs = {n: mx.array(x) if n == "initial_state" else mx.array(x).astype(dtype) for n, x in data.items()}
    o, s = gated_delta_rule(**xs, chunk_size=16, mode="chunk", output_final_state=True,
                            cu_seqlens=None if cu is None else mx.array(cu))
    scans = {u for u in used if u[0].startswith("chunk_scan")}
    bf16 = dtype == mx.bfloat16
    assert scans == ({("chunk_scan_resident", True)} if bf16 else {("chunk_scan", False)})
    assert (("chunk_output", True) in used) == bf16  # and the output kernel, BF16 too
    tol = 2e-2 if bf16 else FP32_TOL
    assert rms_rel(ro, np.array(o.astype(mx.float32))) <= tol and rms_rel(rs, np.array(s)) <= tol


@pytest.mark.parametrize("cu_seqlens", [None, [0, 17, 40]])
def test_pieces_wu_as_bf16_gemms(emulated, monkeypatch, cu_seqlens):
    # PIECES_WU = "gemm": the chunk pieces kernel writes T in bfloat16 and skips W and U, which MLX's
    # GEMMs form from bfloat16 factors (fla's recompute_w_u); the op's forward against the float64
    # oracle at bf16's level, and against the kernel's W and U
    auto_bf16_on_emulator(monkeypatch)
    data = make_inputs(8, 1, 40, 1, 2, 32, h0=True, n_states=2 if cu_seqlens else None)
    ro, rs = gated_delta_reference(**data, cu_seqlens=cu_seqlens)
    xs = {n: mx.array(x) if n == "initial_state" else mx.array(x).astype(mx.bfloat16) for n, x in data.items()}
    cu = None if cu_seqlens is None else mx.array(cu_seqlens)
    calls, pieces = [], kernels.chunk_pieces
    monkeypatch.setattr(kernels, "chunk_pieces", lambda *a: calls.append(pieces(*a)) or calls[-1])
    results = {}
    for wu in ("kernel", "gemm"):
        monkeypatch.setattr(kernels, "PIECES_WU", wu)
        results[wu] = [np.array(x.astype(mx.float32)) for x in gated_delta_rule(
            **xs, chunk_size=16, mode="chunk", output_final_state=True, cu_seqlens=cu)]
    _, _, T, W, U = calls[-1]
    assert W is None and U is None and T.dtype == mx.bfloat16
    o, s = results["gemm"]
    assert rms_rel(ro, o) <= 1e-2 and rms_rel(rs, s) <= 1e-2  # 4e-3 measured, as the kernel's W and U
    assert rms_rel(results["kernel"][0], o) <= 1e-2 and not np.array_equal(results["kernel"][0], o)


def test_auto_scan_wants_full_resident_threadgroups(emulated, monkeypatch):
    # "auto" takes the resident scan only with RESIDENT_SCAN_GROUPS SIMD groups a threadgroup (V = 48:
    # three 16-column blocks, one group); forced, it runs there too
    auto_bf16_on_emulator(monkeypatch)
    assert kernels._resident_scan_choice(4, 16, 32, 32, True)[0] == 64
    assert kernels._resident_scan_choice(4, 16, 32, 48, True) is None
    monkeypatch.setattr(kernels, "SCAN_KERNEL", "resident")
    assert kernels._resident_scan_choice(4, 16, 32, 48, True)[0] == 32


def test_bf16_factors_stored_in_bf16_give_the_same_results(emulated, monkeypatch):
    # the forward writes W, P, the states and u in bfloat16 where their forward reader (the resident
    # scan, the output kernel) rounds them to bfloat16 as factors anyway: the same forward results,
    # bit for bit
    auto_bf16_on_emulator(monkeypatch)
    assert kernels.forward_types(2, 16, 32, 32, True) == (mx.bfloat16,) * 3
    assert kernels.forward_types(2, 16, 32, 32, False) == (mx.float32,) * 3
    with kernels.use_factory("metal", EmulatedKernel):  # Metal multiplies in float: nothing rounds
        monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")
        assert kernels.forward_types(2, 16, 32, 32, True) == (mx.float32,) * 3
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "auto")
    data = make_inputs(1, 1, 40, 1, 2, 32, h0=True)
    xs = {n: mx.array(x) if n == "initial_state" else mx.array(x).astype(mx.bfloat16) for n, x in data.items()}
    written = {}
    for name in ("chunk_pieces", "scan_forward"):
        def spy(*a, _name=name, _fn=getattr(kernels, name)):
            written.setdefault(_name, []).append(_fn(*a))
            return written[_name][-1]
        monkeypatch.setattr(kernels, name, spy)
    results = {}
    for stored in (True, False):
        monkeypatch.setattr(kernels, "FACTORS_IN_BF16", stored)
        results[stored] = gated_delta_rule(**xs, chunk_size=16, mode="chunk", output_final_state=True)
    assert [(w.dtype, p.dtype) for _, p, _, w, _ in written["chunk_pieces"]] == [(mx.bfloat16,) * 2,
                                                                                (mx.float32,) * 2]
    assert [(h.dtype, u.dtype) for h, u, _ in written["scan_forward"]] == [(mx.bfloat16,) * 2,
                                                                          (mx.float32,) * 2]
    for a, b in zip(results[True], results[False]):
        assert np.array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))


@pytest.mark.parametrize("scan", ["simt", "mma", "resident"])
def test_scans_read_k_in_its_input_type(emulated, monkeypatch, scan):
    # k in bfloat16, as the layout leaves it for bf16 inputs; the ops scan gets the same values
    monkeypatch.setattr(kernels, "SCAN_KERNEL", scan)
    check_scans(3, 1, 2, 32, 64, 40, ((0, 2), (2, 3)), k_dtype=mx.bfloat16)


PIECES_CASES = [
    # M, C, K, V, (threads, threadgroup bytes, padded strides)
    (3, 16, 32, 32, (256, 32768, False)),   # more SIMD groups than tiles
    (2, 32, 60, 100, (64, 32768, True)),    # K, V not multiples of the column block
    (2, 64, 128, 40, (256, 32768, False)),  # Metal's 32 KB: 16-column blocks
    (2, 64, 200, 24, (256, 49152, True)),   # the CUDA default (32-column blocks), the 1.3B K
    (1, 64, 100, 72, (64, 32768, False)),   # two SIMD groups: 36 tiles each, 4 blocks of T a row
]


def chunk_kernel_config(monkeypatch, threads, limit, padded):
    """The chunk pieces / grads kernels' threads, threadgroup memory and padding for the emulator."""
    monkeypatch.setattr(kernels, "PIECES_THREADS", threads)
    monkeypatch.setitem(kernels.THREADGROUP_BYTES, "emulated", limit)
    monkeypatch.setitem(kernels.PADDED_STRIDES, "emulated", padded)


@pytest.mark.parametrize("M,C,K,V,config", PIECES_CASES)
def test_chunk_pieces_kernel_matches_ops(emulated, monkeypatch, M, C, K, V, config):
    chunk_kernel_config(monkeypatch, *config)
    check_pieces(M, C, K, V)


@pytest.mark.parametrize("M,C,K,V,config", [PIECES_CASES[i] for i in (0, 1, 4)]
                         + [(2, 24, 40, 16, (64, 32768, True))])  # an odd count of 8-row blocks
def test_chunk_pieces_with_bf16_products(emulated, monkeypatch, M, C, K, V, config):
    chunk_kernel_config(monkeypatch, *config)
    check_pieces_bf16_products(M, C, K, V)


def test_forward_pieces_multiply_in_bf16_where_auto_does(emulated, monkeypatch):
    monkeypatch.setattr(kernels, "BF16_PRODUCT_BACKENDS", {"emulated"})
    assert kernels.pieces_mma(True) and not kernels.pieces_mma(False)
    monkeypatch.setattr(kernels, "PIECES_MMA", False)
    assert not kernels.pieces_mma(True)


OUTPUT_CASES = [
    # M, C, K, V, output type, (stage rows, padded strides, threadgroup bytes)
    (3, 16, 32, 32, mx.float32, (32, False, 32768)),   # two SIMD groups, one stage
    (2, 32, 24, 48, mx.bfloat16, (8, True, 32768)),    # K = 24: three stages; three SIMD groups; bf16
    (2, 64, 40, 16, mx.float32, (32, True, 32768)),    # the GPU shape's C, one SIMD group; stages 32, 8
    (2, 16, 16, 64, mx.float32, (16, False, 4096)),    # 64 columns do not fit: two threadgroups of 32
]


@pytest.mark.parametrize("M,C,K,V,dtype,config", OUTPUT_CASES)
def test_chunk_output_kernel_matches_ops(emulated, monkeypatch, M, C, K, V, dtype, config):
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")
    monkeypatch.setattr(kernels, "OUTPUT_STAGE_ROWS", config[0])
    monkeypatch.setitem(kernels.PADDED_STRIDES, "emulated", config[1])
    monkeypatch.setitem(kernels.THREADGROUP_BYTES, "emulated", config[2])
    check_output(M, C, K, V, dtype, tol=FP32_TOL if dtype == mx.float32 else 4e-3)


def test_chunk_output_with_bf16_products(emulated, monkeypatch):
    # factors rounded to bfloat16 (GDN_MMA_BF16), as for the op's bfloat16 inputs on CUDA
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")
    check_output(2, 32, 24, 48, mx.bfloat16, bf16_products=True, tol=1e-2)
    with pytest.raises(AssertionError):  # the rounding shows: not the float products
        check_output(2, 32, 24, 48, mx.float32, bf16_products=True, tol=1e-4)


ROW_CASES = [(2, 40, None), (1, 45, [0, 13, 45])]  # B, T, cu_seqlens: padded rows; packed sequences


def row_case(B, T, cu_seqlens, C):
    """(sequences, packed, the layout's src map, chunk rows N * B, a random float32 array maker)."""
    packed = cu_seqlens is not None
    seqs = list(zip(cu_seqlens, cu_seqlens[1:])) if packed else [(0, T)] * B
    src, _ = gated_delta._layout_maps(seqs, T, C, packed)
    rng = np.random.default_rng(T)
    r = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    return seqs, packed, src, src.shape[0] // C * B, r


@pytest.mark.parametrize("B,T,cu_seqlens", ROW_CASES)
def test_chunk_output_writes_token_rows(emulated, monkeypatch, B, T, cu_seqlens):
    # given the layout's maps (the op's forward in one block), the kernel writes token rows
    # [B, T, HV, V] itself: the rows of its chunk-major output as the ops layout takes them, padding
    # (a sequence's last chunk; packed sequences) dropped
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")
    C, HV, K, V = 16, 2, 16, 32
    seqs, packed, src, NB, r = row_case(B, T, cu_seqlens, C)
    xs = (r(NB, HV, C, K), r(NB, HV, K, V), r(NB, HV, C, C), r(NB, HV, C, V),
          -mx.cumsum(mx.abs(r(NB, HV, C, 1)) * 0.1, axis=-2))
    chunked = kernels.chunk_output(*xs, mx.bfloat16, False)
    rows = kernels.chunk_output(*xs, mx.bfloat16, False, rows=(src, B, T))
    assert rows.shape == (B, T, HV, V) and rows.dtype == mx.bfloat16
    expected = gated_delta._from_chunks(chunked, seqs, T, B, packed)
    assert np.array_equal(np.array(rows.astype(mx.float32)), np.array(expected.astype(mx.float32)))


@pytest.mark.parametrize("B,T,cu_seqlens", ROW_CASES)
def test_chunk_pieces_read_v_from_token_rows(emulated, B, T, cu_seqlens):
    # given the layout's map (the op's forward in one block), the chunk pieces read v from its token
    # rows [B, T, HV, V]: the same pieces as from its chunk-major layout (zeros where padded)
    C, HV, K, V = 16, 2, 16, 32
    _, _, src, NB, r = row_case(B, T, cu_seqlens, C)
    v = r(B, T, HV, V).astype(mx.bfloat16)
    q, k = r(NB, HV, C, K) * 0.3, r(NB, HV, C, K) * 0.3
    gamma, beta = -mx.cumsum(mx.abs(r(NB, HV, C, 1)) * 0.1, axis=-2), mx.sigmoid(r(NB, HV, C, 1))
    chunked = kernels.chunk_pieces(q, k, kernels.rows_to_chunks(v, src, HV, C, dtype=v.dtype), gamma, beta)
    from_rows = kernels.chunk_pieces(q, k, v, gamma, beta, v_rows=(src, B, T))
    for a, b in zip(chunked, from_rows):
        assert np.array_equal(np.array(a), np.array(b))


def test_output_kernel_only_where_asked(emulated, monkeypatch):
    # OUTPUT_KERNEL "auto": the kernel where products may be bfloat16; GEMMs (None) elsewhere
    monkeypatch.setattr(kernels, "BF16_PRODUCT_BACKENDS", {"emulated"})
    xs = [mx.zeros(s) for s in ((1, 1, 16, 8), (1, 1, 8, 16), (1, 1, 16, 16), (1, 1, 16, 16), (1, 1, 16, 1))]
    assert kernels.chunk_output(*xs, mx.float32, False) is None
    assert kernels.chunk_output(*xs, mx.bfloat16, True) is not None
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "gemm")
    assert kernels.chunk_output(*xs, mx.bfloat16, True) is None
    # "auto" only where one threadgroup covers all value columns (the configuration measured)
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "auto")
    monkeypatch.setitem(kernels.THREADGROUP_BYTES, "emulated", 1100)  # 16 columns fit (1088 bytes), 32 not
    assert kernels._output_choice(16, 8, 16, True)[0] == 16
    assert kernels._output_choice(16, 8, 32, True) is None
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")
    assert kernels._output_choice(16, 8, 32, True)[0] == 16


GRADS_CASES = [
    # M, C, K, V, (threads, threadgroup bytes, padded strides)
    (2, 16, 32, 32, (256, 32768, False)),   # more threads than tiles
    (2, 32, 60, 100, (64, 32768, True)),    # K, V not multiples of the blocks
    (1, 64, 60, 36, (64, 32768, False)),    # 64 threads: 3 C x C tiles and 4 items a thread
    (2, 64, 128, 40, (256, 32768, False)),  # Metal's 32 KB exactly (16-column stages)
    (1, 64, 200, 24, (256, 49152, True)),   # the CUDA default, the 1.3B K
]


@pytest.mark.parametrize("M,C,K,V,config", GRADS_CASES)
def test_chunk_grads_kernel_matches_ops(emulated, monkeypatch, M, C, K, V, config):
    chunk_kernel_config(monkeypatch, *config)
    check_grads(M, C, K, V)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_chunk_kernels_read_qkv_in_their_input_type(emulated, monkeypatch, dtype):
    chunk_kernel_config(monkeypatch, 64, 32768, True)
    check_pieces(2, 32, 60, 100, dtype=dtype)
    check_grads(2, 32, 60, 100, dtype=dtype)


LAYOUT_CASES = [
    # B, T, H, HV, D, C, cu_seqlens, l2norm, dtype
    (2, 75, 2, 4, 32, 16, None, True, mx.float32),  # GVA: two value heads a q/k head
    (1, 70, 1, 2, 60, 32, [0, 5, 40, 70], False, mx.bfloat16),  # packed: three padded sequences
    (1, 50, 2, 2, 100, 16, [0, 17, 50], True, mx.float16),
    (3, 64, 1, 1, 16, 64, None, True, mx.bfloat16),  # no padding; D below a SIMD group
]


@pytest.mark.parametrize("B,T,H,HV,D,C,cu_seqlens,l2norm,dtype", LAYOUT_CASES)
def test_layout_kernels_match_ops(emulated, B, T, H, HV, D, C, cu_seqlens, l2norm, dtype):
    check_layout(B, T, H, HV, D, C, cu_seqlens, l2norm, dtype)


@pytest.mark.parametrize("case", [LAYOUT_CASES[0], LAYOUT_CASES[2]])  # 8-column loads; scalar ones
def test_layout_kernel_rows_past_the_end(emulated, monkeypatch, case):
    # 3 rows a SIMD group: the row count (a multiple of 16) leaves the last group rows past the end
    monkeypatch.setattr(kernels, "LAYOUT_ROWS_PER_GROUP", 3)
    check_layout(*case)


OP_CASES = [
    # B, T, H, HV, D, mask_p, kwargs
    (2, 75, 2, 4, 32, 0.0, {}),
    (1, 70, 1, 2, 60, 1.0, dict(chunk_size=16)),  # g = 0 everywhere, D = 60
    (1, 40, 2, 2, 100, 0.3, dict(chunk_size=32, use_qk_l2norm_in_kernel=True)),
]


@pytest.mark.parametrize("B,T,H,HV,D,mask_p,kw", OP_CASES)
def test_chunked_op_with_kernels_matches_oracle(emulated, B, T, H, HV, D, mask_p, kw):
    data = make_inputs(T + D, B, T, H, HV, D, mask_p=mask_p, h0=True,
                       unit_k=not kw.get("use_qk_l2norm_in_kernel", False))
    oracle_kw = {n: x for n, x in kw.items() if n != "chunk_size"}
    ro, rs = gated_delta_reference(**data, **oracle_kw)
    arrays = {n: mx.array(x) for n, x in data.items()}
    o, s = gated_delta_rule(**arrays, output_final_state=True, mode="chunk", **kw)
    assert rms_rel(ro, np.array(o)) <= FP32_TOL and rms_rel(rs, np.array(s)) <= FP32_TOL


@pytest.mark.parametrize("case", ["plain", "packed", "gates", "gates compiled", "kept pieces", "bf16"])
def test_chunked_grads_with_kernels_match_ops(emulated, monkeypatch, case):
    # GVA throughout; "packed": cu_seqlens and the in-kernel L2 norm; "gates": the layer's options
    # (gate from A_log and dt_bias, beta sigmoid, allow_neg_eigval), A_log and dt_bias differentiated;
    # "compiled": the element-wise chains under mx.compile, as on a GPU; "kept pieces":
    # keep_chunk_pieces, so chunk_pieces runs in the forward only; "bf16": q, k, v in bfloat16, so
    # that k and v reach the kernels in bfloat16
    if case.endswith("compiled"):
        monkeypatch.setattr(chunk, "COMPILE_ON_CPU", True)
        monkeypatch.setattr(gated_delta, "_chunked_fns", {})
        monkeypatch.setattr(chunk, "_compiled", {})
    packed = case == "packed"
    data = make_inputs(5, 1, 50, 2, 4, 32, mask_p=0.3, h0=True, n_states=3 if packed else 1,
                       unit_k=case in ("plain", "bf16"))
    typed = lambda n: mx.array(data[n]).astype(mx.bfloat16 if case == "bf16" and n in "qkv" else mx.float32)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    w = mx.array(np.random.default_rng(1).standard_normal((1, 50, 4, 32)).astype(np.float32))
    kw = {}
    if packed:
        kw = dict(cu_seqlens=mx.array([0, 7, 30, 50]), use_qk_l2norm_in_kernel=True)
    if case.startswith("gates"):
        rng = np.random.default_rng(2)
        data["g"] = rng.standard_normal(data["g"].shape).astype(np.float32)  # the raw gate input a
        data["beta"] = rng.standard_normal(data["beta"].shape).astype(np.float32)
        data["A_log"] = np.log(rng.uniform(1, 16, 4)).astype(np.float32)
        data["dt_bias"] = rng.standard_normal(4).astype(np.float32)
        names += ["A_log", "dt_bias"]
        kw = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                  use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True)

    def grads():
        def loss(*xs):
            o, s = gated_delta_rule(**dict(zip(names, xs)), output_final_state=True, mode="chunk",
                                    chunk_size=16, **kw)
            return (o.astype(mx.float32) * w).sum() + s.sum()
        return mx.grad(loss, argnums=list(range(len(names))))(*[typed(n) for n in names])

    if case == "kept pieces":
        kw = dict(keep_chunk_pieces=True)
    pieces_calls = []
    pieces = kernels.chunk_pieces
    monkeypatch.setattr(kernels, "chunk_pieces", lambda *xs: pieces_calls.append(xs[1].dtype) or pieces(*xs))
    got = grads()
    with kernels.use_factory("ops", None):
        ref = grads()
    assert len(pieces_calls) == (1 if case == "kept pieces" else 2)
    # k reaches the kernels in its input type unless L2-normalised
    assert set(pieces_calls) == {mx.bfloat16 if case == "bf16" else mx.float32}
    assert chunk._compiled or not case.endswith("compiled"), "nothing was compiled"
    for n, a, b in zip(names, ref, got):
        assert a.dtype == b.dtype == typed(n).dtype, n
        assert rms_rel(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))) <= FP32_TOL, n


def test_bf16_grads_with_auto_bf16_kernels(emulated, monkeypatch):
    # bfloat16 inputs with the L2 norm where "auto" multiplies in BF16 (as on CUDA): the forward lays
    # out q and k in bfloat16 (forward_qk_type) and keeps the states and u in bfloat16
    # (forward_types), which the backward then reads; its own layout of q and k stays float32. The
    # gradients against the ops path's (float32 from the same inputs): 3e-3 measured, bf16's level
    auto_bf16_on_emulator(monkeypatch)
    data = make_inputs(6, 1, 40, 1, 2, 32, mask_p=0.3, h0=True)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    xs = [mx.array(data[n]).astype(mx.bfloat16 if n in "qkv" else mx.float32) for n in names]
    w = mx.array(np.random.default_rng(1).standard_normal((1, 40, 2, 32)).astype(np.float32))

    def grads():
        def loss(*xs):
            o, s = gated_delta_rule(**dict(zip(names, xs)), output_final_state=True, mode="chunk",
                                    chunk_size=16, use_qk_l2norm_in_kernel=True)
            return (o.astype(mx.float32) * w).sum() + s.sum()
        return mx.grad(loss, argnums=list(range(len(names))))(*xs)

    layouts, scans = [], []
    rows_to_chunks, scan_forward = kernels.rows_to_chunks, kernels.scan_forward
    monkeypatch.setattr(kernels, "rows_to_chunks", lambda *a, **kw: layouts.append(kw.get("dtype")) or
                        rows_to_chunks(*a, **kw))
    monkeypatch.setattr(kernels, "scan_forward", lambda *a: scans.append(a[-1]) or scan_forward(*a))
    got = grads()
    # q, k forward (the chunk pieces read v from its rows); q, k, v and the output's cotangent backward
    assert layouts == [mx.bfloat16, mx.bfloat16, mx.float32, mx.float32, mx.bfloat16, None]
    assert scans == [mx.bfloat16]
    with kernels.use_factory("ops", None):
        ref = grads()
    for n, a, b in zip(names, ref, got):
        assert rms_rel(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))) <= 1e-2, n


@pytest.mark.parametrize("packed", [False, True])
def test_model_gradients_with_kernels_match_ops(emulated, packed):
    # a whole tiny model (convolutions, gates, norms around the op), as train.py runs it
    mx.random.seed(4)
    model = Model(ModelArgs(**PRESETS["tiny-gdn"]))
    ids = mx.array(np.random.default_rng(4).integers(0, 500, (2, 41)))
    docs = mx.array(np.repeat([[0] * 15 + [1] * 25], 2, axis=0)) if packed else None
    args = (ids[:, :-1], ids[:, 1:], mx.ones((2, 40)), docs)
    loss, got = nn.value_and_grad(model, loss_fn)(model, *args)
    with kernels.use_factory("ops", None):
        ref_loss, ref = nn.value_and_grad(model, loss_fn)(model, *args)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    ref = dict(tree_flatten(ref))
    for name, g in tree_flatten(got):
        assert rms_rel(np.array(ref[name]), np.array(g)) <= 1e-4, name


DECODE_CASES = [
    # B, T, H, HV, K, V, options
    (2, 1, 2, 4, 64, 64, dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                              use_beta_sigmoid_in_kernel=True, dt_bias=True)),
    (1, 3, 1, 1, 100, 60, dict(use_qk_l2norm_in_kernel=True)),
    (1, 2, 2, 2, 60, 100, dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True,
                               use_gate_in_kernel=True)),
    (1, 4, 1, 2, 32, 32, {}),
]


@pytest.mark.parametrize("B,T,H,HV,K,V,opts", DECODE_CASES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_decode_kernel_matches_oracle(emulated, B, T, H, HV, K, V, opts, dtype):
    opts = dict(opts)
    rng = np.random.default_rng(K + V + T)
    data = make_inputs(K * T, B, T, H, HV, K, V, mask_p=0.2, h0=True,
                       unit_k=not opts.get("use_qk_l2norm_in_kernel", False))
    if opts.get("use_gate_in_kernel"):
        data["g"] = rng.standard_normal(data["g"].shape).astype(np.float32)
        opts["A_log"] = np.log(rng.uniform(1, 16, HV)).astype(np.float32)
        if opts.pop("dt_bias", False):
            opts["dt_bias"] = rng.standard_normal(HV).astype(np.float32)
    if opts.get("use_beta_sigmoid_in_kernel"):
        data["beta"] = rng.standard_normal(data["beta"].shape).astype(np.float32)
    rounded = {n: (x if n == "initial_state" else np.array(mx.array(x).astype(dtype).astype(mx.float32)))
               for n, x in data.items()}
    ro, rs = gated_delta_reference(**rounded, **opts)
    arrays = {n: mx.array(x) if n == "initial_state" else mx.array(x).astype(dtype)
              for n, x in data.items()}
    mx_opts = {n: mx.array(x) if isinstance(x, np.ndarray) else x for n, x in opts.items()}
    o, s = gated_delta_rule(**arrays, output_final_state=True, mode="recurrent", **mx_opts)
    assert o.dtype == dtype
    tol = FP32_TOL if dtype == mx.float32 else 5e-3
    assert_close("o", ro, np.array(o.astype(mx.float32)), tol)
    assert_close("state", rs, np.array(s), tol)


def test_decode_kernel_gradient_is_the_recurrence(emulated):
    data = make_inputs(3, 1, 3, 1, 2, 32, h0=True)
    names = ("q", "k", "v", "g", "beta", "initial_state")

    def grads():
        loss = lambda *xs: gated_delta_rule(**dict(zip(names, xs)), mode="recurrent")[0].sum()
        return mx.grad(loss, argnums=list(range(6)))(*[mx.array(data[n]) for n in names])

    got = grads()
    with kernels.use_factory("ops", None):
        ref = grads()
    for n, a, b in zip(names, ref, got):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6, err_msg=n)


def test_emulator_catches_a_missing_barrier():
    # thread 0 reads what thread 1 wrote to threadgroup memory: right with the barrier, a race without
    body = """
    threadgroup float shared[2];
    const uint i = thread_position_in_threadgroup.x;
    shared[i] = float(i + 1);
    {BARRIER}
    out[i] = shared[1 - i];
    """
    check_race_probe("barrier_probe", body, threads=2, want=[2.0, 1.0])


def test_emulator_catches_a_race_within_a_simd_group():
    # lanes read a stored 8x8 product back without synchronising and multiply it by a lower-triangular
    # L: a lane's results need only rows written by lanes before it, right in thread order; the
    # reverse order exposes the race
    body = """
    threadgroup float m[64];
    const uint i = thread_position_in_threadgroup.x;
    m[i] = i / 8 >= i % 8 ? 1.0f : 0.0f;
    m[i + 32] = (i + 32) / 8 >= i % 8 ? 1.0f : 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 low, ones = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
    simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_load(low, &m[0], 8);
    simdgroup_multiply_accumulate(s, low, ones, s);
    {BARRIER}
    simdgroup_store(s, &m[0], 8);
    {BARRIER}
    simdgroup_load(s, &m[0], 8);
    simdgroup_float8x8 r = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_multiply_accumulate(r, low, s, r);
    simdgroup_store(r, &out[0], 8);
    """
    want = [(r + 1) * (r + 2) / 2 for r in range(8) for _ in range(8)]  # L (L 1) = L [row + 1]
    check_race_probe("simd_race_probe", body, threads=32, want=want)


def check_race_probe(name, body, threads, want):
    """`body` with its {BARRIER}s in place gives `want`; without them the emulator reports a race."""
    run = lambda barrier: EmulatedKernel(name, ["x"], ["out"], body.replace("{BARRIER}", barrier))(
        inputs=[mx.zeros((1,))], output_shapes=[(len(want),)], output_dtypes=[mx.float32],
        grid=(threads, 1, 1), threadgroup=(threads, 1, 1))[0]
    assert run("threadgroup_barrier(mem_flags::mem_threadgroup);").tolist() == want
    with pytest.raises(RuntimeError, match="race"):
        run("")


def test_emulator_poisons_threadgroup_memory_between_threadgroups():
    # only the first threadgroup writes shared[0]; every threadgroup reads it. On a GPU the later ones
    # read whatever is there: the emulator gives them NaN, not what the first one left.
    body = """
    threadgroup float shared[1];
    const uint g = threadgroup_position_in_grid.x;
    if (g == 0) { shared[0] = 5.0f; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[g] = shared[0];
    """
    out = EmulatedKernel("poison_probe", ["x"], ["out"], body)(
        inputs=[mx.zeros((1,))], output_shapes=[(2,)], output_dtypes=[mx.float32],
        grid=(2, 1, 1), threadgroup=(1, 1, 1))[0]
    assert out[0].item() == 5.0 and np.isnan(out[1].item())


def test_emulator_reports_barrier_divergence():
    body = """
    if (thread_position_in_threadgroup.x == 0) { return; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[0] = 1.0f;
    """
    kern = EmulatedKernel("divergence_probe", ["x"], ["out"], body)
    with pytest.raises(RuntimeError, match="divergence"):
        kern(inputs=[mx.zeros((1,))], output_shapes=[(1,)], output_dtypes=[mx.float32],
             grid=(2, 1, 1), threadgroup=(2, 1, 1))


def test_emulator_rejects_a_product_as_a_right_factor():
    # the CUDA prelude keeps a product only as an accumulator (= left factor): it must be stored and
    # loaded before it is a right factor
    body = """
    threadgroup float m[64];
    m[thread_position_in_threadgroup.x] = 1.0f;
    m[thread_position_in_threadgroup.x + 32] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 a, p = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    simdgroup_load(a, &m[0], 8);
    simdgroup_multiply_accumulate(p, a, a, p);
    simdgroup_multiply_accumulate(p, p, a, p);  // a left factor: allowed
    simdgroup_multiply_accumulate(p, a, p, p);
    simdgroup_store(p, &out[0], 8);
    """
    kern = EmulatedKernel("product_probe", ["x"], ["out"], body)
    with pytest.raises(RuntimeError, match="product used as a right factor"):
        kern(inputs=[mx.zeros((1,))], output_shapes=[(64,)], output_dtypes=[mx.float32],
             grid=(32, 1, 1), threadgroup=(32, 1, 1))


def test_kernels_are_named_by_their_text_and_types(monkeypatch):
    # MLX caches compiled kernels by name and template values (CUDA: also as PTX files other
    # processes load): on Metal and CUDA a changed body, or arrays of other types, must get a new
    # name, or the code compiled first would run
    names = []

    def factory(name, **_):
        names.append(name)
        return lambda **launch: None

    monkeypatch.setattr(kernels, "_builders", {})
    monkeypatch.setattr(kernels, "_compiled", {})
    body = metal_kernels.source("decode_step")
    launch = lambda dtype: kernels.get_kernel("decode_step")(
        inputs=[mx.zeros((1,), dtype=dtype)], output_dtypes=[mx.float32])
    with kernels.use_factory("cuda", factory):
        launch(mx.float32)
        launch(mx.float32)  # built once
        launch(mx.bfloat16)
        monkeypatch.setattr(metal_kernels, "source", lambda n: body + "\n// changed")
        kernels.forget_kernels()
        launch(mx.float32)
    with kernels.use_factory("emulated", factory):  # the emulator keys its own cache on the code
        launch(mx.float32)
    assert len(names) == 4 and all(n.startswith("decode_step_") for n in names[:3])
    assert len(set(names[:3])) == 3 and names[3] == "decode_step"


def test_cuda_launch_bounds_go_in_the_kernel_header(monkeypatch):
    # mx.fast.cuda_kernel writes no __launch_bounds__: the header gives them to the kernels that
    # CUDA_MIN_THREADGROUPS names, under a name of their own (nvcc honours them: test_benchmarks_smoke)
    made = []
    monkeypatch.setattr(kernels, "backend", lambda: "cuda")
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: made.append(kw) or (lambda **_: None))
    monkeypatch.setattr(kernels, "_builders", {})
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "CUDA_MIN_THREADGROUPS", {"chunk_grads": 3})
    launch = lambda *args: kernels.get_kernel(*args)(inputs=[], output_dtypes=[mx.float32])
    launch("chunk_grads", 256)
    launch("chunk_pieces", 256)
    with pytest.raises(ValueError, match="threadgroup size"):
        kernels.get_kernel("chunk_grads")
    monkeypatch.setattr(kernels, "CUDA_MIN_THREADGROUPS", {})
    launch("chunk_grads", 256)
    bounded, pieces, plain = made
    assert bounded["header"].startswith(metal_kernels.prelude("cuda"))
    assert bounded["header"].endswith("__launch_bounds__(256, 3)\n")
    assert "__launch_bounds__" not in pieces["header"] + plain["header"]
    assert bounded["name"] != plain["name"]


def test_every_kernel_file_was_executed():
    # runs last in this module: each .metal body must have been run by a test above
    files = set(metal_kernels.kernel_files())
    assert files == set(metal_kernels.KERNELS), "metal_kernels.KERNELS is out of date"
    missing = files - executed
    assert not missing, f"kernel files no test executed: {sorted(missing)}"
