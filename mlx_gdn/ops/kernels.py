"""Launching the kernels of metal_kernels/ (Metal on a Mac, CUDA through MLX's CUDA build).

`backend()` says which path `gated_delta_rule` takes: "metal", "cuda", or "ops" (plain MLX ops, the
CPU path). MLX_GDN_BACKEND=ops forces the ops path. `use_factory` swaps the kernel compiler (the
tests run every kernel through a CPU emulator that is called like mx.fast.metal_kernel).
"""

import contextlib
import hashlib
import os

import mlx.core as mx

import metal_kernels

_SCAN_IO = (["A", "X", "Bm", "Y", "gamma", "h_in", "seg_start", "seg_end", "dims"],
            ["states", "x_new", "h_out"])
SPECS = {
    "decode_step": (["q", "k", "v", "g", "beta", "A_log", "dt_bias", "scale", "state_in"],
                    ["o", "state_out"]),
    "chunk_scan": _SCAN_IO,  # the SIMT and the SIMD-group-matrix scans take the same arguments
    "chunk_scan_mma": _SCAN_IO,
    "chunk_scan_resident": _SCAN_IO,
    "chunk_pieces": (["q", "k", "v", "gamma", "beta", "src", "dims"], ["KKG", "P", "T", "W", "U"]),
    "chunk_output": (["q", "states", "P", "u", "gamma", "src", "dims"], ["o"]),
    "chunk_grads": (["q", "k", "v", "dout", "u", "du", "du_h", "dKt", "dQg", "T", "W", "U", "KKG", "P",
                     "gamma", "beta", "dchunk"], ["dq", "dk", "dv", "dg", "dbeta"]),
    "rows_to_chunks": (["x", "src", "scale", "dims"], ["y"]),
    "chunks_to_rows": (["y", "x", "dst", "scale", "dims"], ["out"]),
}
TG_COLUMNS = 4  # decode: value columns (SIMD groups) per threadgroup
# Chunk scan: value columns per threadgroup (smaller where threadgroup memory is short) and threads.
# H100 sweep (RESULTS.md, sixth session): 16 columns and 256 threads were the best or within 6% of
# it at every head shape measured (8 or 32 columns, 128 or 384 threads).
SCAN_TILE = 16
SCAN_THREADS = 256
# Scan threadgroups that run at once (H100: 132 SMs x 2 at 256 threads and ~100 registers). Where
# the grid at SCAN_TILE columns is larger, the tile is doubled: fewer, fuller threadgroups instead of
# a second wave (H100, (4, 4096, 16, 128): forward 1.75 -> 1.31 ms, reverse 1.82 -> 1.44, eighth
# session). Unmeasured on Apple GPUs: no doubling there.
SCAN_RESIDENT = {"cuda": 264}
THREADGROUP_BYTES = {"metal": 32768, "cuda": 49152}  # Metal's limit; CUDA's for static shared memory
# The scan kernel: "simt" (chunk_scan.metal, 4 x 4 register tiles) or "mma" (chunk_scan_mma.metal,
# SIMD-group 8x8 matrices). H100, scan alone at 8192 tokens, forward / reverse ms (RESULTS.md, sixth
# session), simt 256 threads vs mma 512: (H, K, V) = (9, 128, 256) 1.70 / 1.79 vs 1.89-2.00 /
# 2.29-2.48; (16, 128, 128) 1.20 / 1.30 vs 1.08-1.15 / 1.31-1.48; (9, 200, 400) 2.46 / 2.69 vs 3.8 /
# 4.5 (the 8x8 scan's rows do not fit 48 KB there). Twelfth session, forward + reverse at 512 threads,
# (1, 8192, 16), (4, 4096, 16), (8, 2048, 32) with K = V = 128: simt 1.87 / 2.48 / 4.53 ms, mma (8x8
# products in pairs) 2.26 / 4.20 / 8.15, and with a TF32 prelude still 2.00 / 3.76 / 7.26.
# "resident" (chunk_scan_resident.metal: each SIMD group keeps 16 value columns of the state in 8x8
# matrices for the whole scan; K a multiple of 8, V of 16). "auto": the resident scan where the
# inputs are bfloat16, the backend multiplies 8x8 matrices in bfloat16 (BF16_PRODUCT_BACKENDS) and
# the grid has RESIDENT_MIN_GROUPS SIMD groups; the SIMT scan elsewhere. H100, fourteenth session, forward +
# reverse scan at K = V = 128: with float products (FP64 or TF32 x 3 tensor cores) the resident scan
# was no faster than the SIMT one (4.6-6.1 ms against 2.2 at (1, 8192, 16); 4.9-5.7 against 5.05 at
# (8, 2048, 32)), with BF16 products 2.6 and 2.9.
SCAN_KERNEL = "auto"
MMA_SCAN_THREADS = 512
# SIMD groups (16 value columns each) a threadgroup, at most, by direction. H100, nineteenth session,
# op at (4, 4096, 16) (64 rows: 64 threadgroups of 8 on 132 SMs, 128 of 4): forward 1.30-1.34 ms with
# 4 against 1.41-1.45 with 8; forward + backward with 4 in both directions 6.75-6.83 against
# 6.67-6.86, with 4 forward only 6.86-6.90 (the backward's kernels unchanged: a
# spread between calls, not explained); (8, 2048, 32) the same either way. (At 248 registers, before
# the scan's pointer bases, 4 was slower forward too, eighteenth session.)
RESIDENT_SCAN_GROUPS = {"forward": 4, "reverse": 8}
RESIDENT_STAGED_PER_THREAD = 32  # staged floats a thread holds ahead, at most (registers)
BF16_PRODUCT_BACKENDS = {"cuda"}  # where "auto" lets 8x8 products round bfloat16 inputs' factors
# H100, bf16 inputs, the op's compiled forward + backward (ms), resident against SIMT: (4, 4096, 16)
# = 512 SIMD groups 7.45-7.65 against 8.20 (the scans alone about level: forward 1.31 against 1.24);
# (8, 2048, 32) = 2048 groups 14.5-14.8 against 16.4; (1, 8192, 16) = 128 groups 5.9 against 5.0.
# Fifteenth session (loads a stage ahead): at (1, 8192, 16) the resident forward scan alone is now
# faster (1.27-1.33 against 1.47 ms), but the op's forward was not (1.91 against 1.79-1.81).
RESIDENT_MIN_GROUPS = 512
PADDED_STRIDES = {"cuda": True}  # threadgroup arrays padded against CUDA's shared-memory bank conflicts
# CUDA: threadgroups an SM that a kernel's registers must leave room for (its __launch_bounds__).
# mx.fast.cuda_kernel writes no attributes, so the header redefines __global__ for that kernel.
# ptxas alone gives chunk_grads 128 registers (2 threadgroups of 256 an SM), the scans 87-105; the
# 8x8 scan needs its 512 threads held to 128 registers (nvcc gives it 127-134), or it cannot launch.
# The resident scan took 244-254 registers (one threadgroup of 256 an SM; 168-185 before its loads
# were issued a stage ahead) and no bounds: held to 128 (two an SM, fourteenth session) its forward at
# (8, 2048, 32) took 1.15 ms instead of 1.47, but the op at (4, 4096, 16) lost 8%. With pointer bases
# (nineteenth session) 199 (reverse 225) at 8 SIMD groups, 230 at 4 (two threadgroups of 128 an SM).
# chunk_output issues a stage's loads together (168 registers unbounded in the seventeenth session,
# held to 2 threadgroups: 128 and spills; held to 3 it lost 40%). With 8-element loads and the next
# stage's loads in flight during the products (eighteenth session) nvcc gives it 125 and no spills:
# the bound (2) changes nothing there, but keeps NVRTC's count (up to ~18 more) from halving it.
# chunk_pieces: 72 registers with its BF16 8x8 products (PIECES_MMA), 3 threadgroups an SM; held to
# 4 (64 registers, no spills; the float-FMA build took 64 from NVRTC anyway) the op's forward was
# 7-11% faster (H100, seventeenth session).
CUDA_MIN_THREADGROUPS = {"chunk_grads": 3, "chunk_scan_mma": 1, "chunk_output": 2, "chunk_pieces": 4}

_override = None  # (backend name, factory) while use_factory is active
_builders = {}  # get_kernel's key -> (factory, header, source)
_compiled = {}  # the same key and the arrays' types -> the kernel


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


def get_kernel(name, threads=None, bf16_products=False):
    """The kernel `name` for the current backend, called like mx.fast.metal_kernel's kernels;
    `threads`, the threadgroup size it will be launched with, is needed where CUDA_MIN_THREADGROUPS
    names the kernel. bf16_products: its 8x8 matrix products take bfloat16 factors (GDN_MMA_BF16:
    the CUDA prelude and the emulator; Metal's multiply in float)."""
    which = backend()
    if which == "ops":
        raise RuntimeError("no kernel backend: Metal and CUDA are unavailable (or MLX_GDN_BACKEND=ops)")
    bounds = launch_bounds(name, threads) if which == "cuda" and _override is None else ""
    key = (which, name, id(_override[1]) if _override else None, bounds, bf16_products)
    if key not in _builders:
        if _override is not None:
            factory, header = _override[1], BF16_PRODUCTS if bf16_products else ""
        elif which == "metal":
            factory, header = mx.fast.metal_kernel, metal_kernels.prelude("metal")
        else:
            factory, header = mx.fast.cuda_kernel, cuda_header(name, threads, bf16_products=bf16_products)
        _builders[key] = (factory, header, metal_kernels.source(name))
    return lambda **launch: _typed_kernel(key, launch["inputs"], launch["output_dtypes"])(**launch)


# The caches of compiled functions that capture kernels when traced (gated_delta's whole op, chunk's
# fused chains, as functions returning the dict): forget_kernels empties them. What they held is kept
# alive, never freed: on CUDA, freeing a traced function (and the kernels it held) between two
# timings aborted the process ("Resource deadlock avoided", eighteenth session).
forget_with_kernels = []
_retired = []


def forget_kernels():
    """Drop the kernels built so far, and the compiled functions that captured them (a benchmark
    swapping kernel bodies builds them anew: the whole op is compiled on a GPU, and until the
    eighteenth session its trace kept running the first bodies it captured, so ab_settings' body
    swaps timed one text twice)."""
    _retired.extend([dict(_builders), dict(_compiled)])
    _builders.clear()
    _compiled.clear()
    for cache in forget_with_kernels:
        _retired.append(dict(cache()))
        cache().clear()


def _typed_kernel(key, inputs, output_dtypes):
    """get_kernel's kernel `key` built for these input and output types. MLX caches a compiled custom
    kernel under its name and template values alone (in the process, and on CUDA also as PTX files
    that later processes load), not the types of the arrays it was built for: the name carries
    them, or a call with other types would run the code compiled for the first."""
    types = tuple(x.dtype for x in inputs) + tuple(output_dtypes)  # not str(): 6 us a decode step
    if key + types not in _compiled:
        which, name = key[:2]
        factory, header, source = _builders[key]
        inputs_names, outputs_names = SPECS[name]
        if which in ("metal", "cuda"):
            name = text_named(name, " ".join(map(str, types)) + header + source)
        _compiled[key + types] = factory(name=name, input_names=inputs_names,
                                         output_names=outputs_names, source=source, header=header)
    return _compiled[key + types]


BF16_PRODUCTS = "#define GDN_MMA_BF16\n"


def cuda_header(name, threads, blocks=None, bf16_products=False):
    """The CUDA header of kernel `name`: its multiply mode, the prelude, and its launch bounds
    (launch_bounds)."""
    mode = BF16_PRODUCTS if bf16_products else ""
    return mode + metal_kernels.prelude("cuda") + launch_bounds(name, threads, blocks)


def launch_bounds(name, threads, blocks=None):
    """CUDA header lines giving kernel `name` __launch_bounds__(threads, blocks), blocks by default
    CUDA_MIN_THREADGROUPS[name]; "" for none. They follow the prelude: the kernel MLX writes after
    them is the only __global__ function left in the program."""
    blocks = CUDA_MIN_THREADGROUPS.get(name) if blocks is None else blocks
    if not blocks:
        return ""
    if threads is None:
        raise ValueError(f"{name}: CUDA_MIN_THREADGROUPS needs the threadgroup size")
    return ("\n#undef __global__\n"
            f"#define __global__ __attribute__((global)) __launch_bounds__({threads}, {blocks})\n")


def text_named(name, text):
    """name plus a digest of the kernel's text (and its arrays' types). MLX caches a compiled custom
    kernel under its name and template values alone: in the process, and on CUDA also as PTX files
    (/tmp/mlx/<version>/ptx) that later processes load. Under a fixed name, a changed body (a new
    mlx_gdn, or a variant being measured) would run the code compiled first."""
    return f"{name}_{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def _threadgroup_memory():
    """(bytes a threadgroup may use, whether to pad row strides) for the current backend; a runner
    not named (the emulator) gets Metal's limit and no padding unless a test sets them."""
    which = backend()
    return THREADGROUP_BYTES.get(which, THREADGROUP_BYTES["metal"]), PADDED_STRIDES.get(which, False)


def _scan_flags(segments, N, reverse):
    """Per chunk, in scan order: the segment whose scan starts / ends there, or -1."""
    start, end = [-1] * N, [-1] * N
    for s, (c0, c1) in enumerate(segments):
        first, last = (c1 - 1, c0) if reverse else (c0, c1 - 1)
        start[first], end[last] = s, s
    return mx.array(start, dtype=mx.int32), mx.array(end, dtype=mx.int32)


def _scan_bytes(K, C, tile, rows, threads):
    """Threadgroup memory of chunk_scan.metal: h_s, x_s, m_s and p_s (its k-split partial sums)."""
    k4 = -(-K // 4) * 4
    tiles = rows // 4 * tile // 4
    splits = threads // tiles if threads > tiles else 1
    return 4 * (k4 * tile + C * tile + k4 * rows + splits * rows * tile)


def _scan_tiles(K, C, threads, limit, tile):
    """(value columns, staged chunk rows) per threadgroup: the widest up to `tile` that fit `limit`
    bytes."""
    while True:
        rows = C
        while rows > 8 and _scan_bytes(K, C, tile, rows, threads) > limit:
            rows //= 2
        if tile == 4 or _scan_bytes(K, C, tile, rows, threads) <= limit:
            return tile, rows
        tile //= 2


def _mma_scan_config(K, C, threads, limit, padded):
    """chunk_scan_mma.metal's value columns, staged rows and template values (k splits, row strides):
    the widest tile, then the most rows a stage, that fit `limit` bytes. Padded strides put the lanes
    of a CUDA fragment load in distinct shared-memory banks."""
    k16 = -(-K // 16) * 16  # the state's rows in pairs of 8-row blocks
    for tile in (SCAN_TILE, 8):
        hst = tile + (8 if tile % 32 in (0, 16) else 16) if padded else tile
        rows = C
        while rows >= 16:
            ast, bst = (k16 + 4, rows + 4) if padded else (k16, rows)
            # the k sum of A h split so that every SIMD group works, or as far as memory allows
            splits = max(1, threads // 32 // (rows // 16))
            while splits >= 1:
                floats = max(rows * ast, k16 * bst) + (k16 + C + splits * rows) * hst
                if 4 * floats <= limit:
                    return tile, rows, (("KS", splits), ("AST", ast), ("BST", bst), ("HST", hst))
                splits //= 2
            rows //= 2
    raise ValueError(f"chunk_scan_mma: K = {K} does not fit {limit} bytes of threadgroup memory")


def _resident_scan_config(K, C, V, limit, padded, groups):
    """chunk_scan_resident.metal's (threads, value columns, template values), or None where it does
    not apply (K not a multiple of 8, V of 16, or no stage fits): the most SIMD groups up to
    `groups` that divide V's 16-column blocks, then the most rows a stage that fit
    `limit` bytes (two stages and the diagonals) and RESIDENT_STAGED_PER_THREAD (or else the
    fewest). Padded strides: the A rows, read transposed, two lanes a bank; the B rows one."""
    if K % 8 or V % 16:
        return None
    while (V // 16) % groups:
        groups //= 2
    threads = 32 * groups
    ast, bst = (K + 8, K + 4) if padded else (K, K)
    fitting = [rows for rows in range(8, C + 1, 8)
               if C % rows == 0 and 4 * (2 * rows * max(ast, bst) + (C // 8 + 1) * 64) <= limit]
    if not fitting:
        return None
    held = [rows for rows in fitting if rows * K <= RESIDENT_STAGED_PER_THREAD * threads]
    rows = max(held) if held else min(fitting)
    return threads, 16 * groups, (("CB", rows), ("AST", ast), ("BST", bst))


def _auto_bf16(bf16_products):
    """Whether an "auto" kernel choice may multiply in BF16: bfloat16 inputs on a backend in
    BF16_PRODUCT_BACKENDS."""
    return bf16_products and backend() in BF16_PRODUCT_BACKENDS


def _resident_scan_choice(R, C, K, V, bf16_products, reverse=False):
    """_resident_scan_config's values where SCAN_KERNEL takes the resident scan for R rows (batch x
    value heads), else None. "auto" takes it only with RESIDENT_SCAN_GROUPS SIMD groups a
    threadgroup (the scan's direction's), i.e. V a multiple of their columns (the configuration
    measured): V = 400 (gdn-1.3b) would give one, each thread staging 50 values, and ptxas spills
    (255 registers; fifteenth session)."""
    groups = RESIDENT_SCAN_GROUPS["reverse" if reverse else "forward"]
    wanted = SCAN_KERNEL == "resident" or (
        SCAN_KERNEL == "auto" and _auto_bf16(bf16_products) and V % (16 * groups) == 0
        and R * V // 16 >= RESIDENT_MIN_GROUPS)
    return _resident_scan_config(K, C, V, *_threadgroup_memory(), groups) if wanted else None


def _scan(A, X, Bm, Y, gamma, h_in, segments, reverse, bf16_products, state_dtype=mx.float32):
    """The chunk_scan kernel on chunk-major arrays [N * B, HV, ...] (k, not Kt: Bm forward, A
    backward); returns (states, x_new, h_out), states and x_new in state_dtype (h_out float32).
    bf16_products: the inputs were bfloat16, and where SCAN_KERNEL picks the resident scan its
    products may be too (as fla's)."""
    NB, HV, C, K = A.shape
    V = X.shape[-1]
    S = len(segments)
    B = h_in.shape[0] // S
    N, R = NB // B, B * HV
    # more staged rows a step where the runner allows (fewer barriers)
    limit, padded = _threadgroup_memory()
    in_registers = _resident_scan_choice(R, C, K, V, bf16_products, reverse)
    if in_registers:
        name, (threads, tile, extra) = "chunk_scan_resident", in_registers
        extra += (("AT", A.dtype), ("BT", Bm.dtype))
    elif SCAN_KERNEL == "mma":
        name, threads = "chunk_scan_mma", MMA_SCAN_THREADS
        tile, rows, extra = _mma_scan_config(K, C, threads, limit, padded)
    else:
        name, threads = "chunk_scan", SCAN_THREADS
        extra = (("AT", A.dtype), ("BT", Bm.dtype), ("XT", X.dtype))
        at_once = SCAN_RESIDENT.get(backend())  # threadgroups that run at once
        wide = at_once is not None and R * -(-V // SCAN_TILE) > at_once
        tile, rows = _scan_tiles(K, C, threads, limit, 2 * SCAN_TILE if wide else SCAN_TILE)
    # Y when the scan has none (unread): 8 elements, as Metal passes an array of fewer in its constant
    # address space, where the resident scan's SIMD-group load of it (in a branch not taken) does not
    # compile (tests/test_metal_source.py found it). Its own constant, not zeros(8): that one may be
    # an input of the compiled chunked function (absent gate parameters, 8 value heads), and MLX
    # refuses to compile a function that reads one of its inputs from a closure as well.
    has_y = Y is not None
    y = Y if has_y else constant("unread Y", lambda: mx.zeros((8,)))
    states, x_new, h_out = get_kernel(name, threads, bool(in_registers and bf16_products))(
        inputs=[A, X, Bm, y, gamma.reshape(N, R, C), h_in,
                *_scan_flags(segments, N, reverse), mx.array([N, R], dtype=mx.int32)],
        template=[("K", K), ("V", V), ("C", C), ("THREADS", threads), ("REVERSE", reverse),
                  ("HAS_Y", has_y), *(() if in_registers else (("BV", tile), ("CB", rows))),
                  ("StateT", state_dtype), *extra],
        grid=(threads, -(-V // tile), R), threadgroup=(threads, 1, 1),
        output_shapes=[(N, R, K, V), (N, R, C, V), (S * R, K, V)],
        output_dtypes=[state_dtype, state_dtype, mx.float32])
    return (states.reshape(N * B, HV, K, V), x_new.reshape(N * B, HV, C, V),
            h_out.reshape(S * B, HV, K, V))


def scan_forward(W, U, k, gamma, h0, segments, bf16_products=False, state_dtype=mx.float32):
    """Kernel twin of chunk._scan_forward (same results), from k (any float type) and gamma instead
    of Kt = k e^{gamma_C - gamma} and decay = e^{gamma_C}: the kernel scales in place.
    bf16_products: the op's inputs were bfloat16 (see _scan); the states and u in state_dtype
    (forward_types)."""
    return _scan(W, U, k, None, gamma, h0, segments, False, bf16_products, state_dtype)


def scan_backward(PdO, QdO, k, W, gamma, dhT, segments, bf16_products=False):
    """Kernel twin of chunk._scan_backward (same results), k, gamma, bf16_products as in
    scan_forward."""
    dh_next, du, dh0 = _scan(k, PdO, W, QdO, gamma, dhT, segments, True, bf16_products)
    return du, dh_next, dh0


PIECES_THREADS = 256  # chunk_pieces: a chunk's 136 lower 4x4 tiles of K K^T and Q K^T, 256 of W and U
# (PIECES_MMA: 8 SIMD groups for 36 lower 8x8 blocks, and 8 column blocks of W or U)


def _pieces_config(C, limit, padded):
    """chunk_pieces.metal's column block KC and row strides: the widest KC whose stage fits `limit`."""
    pad = 4 if padded else 0
    cs, ts = C + pad, C + pad
    for kc in (32, 16, 8):
        floats = max(2 * kc * ts, C * cs) + C * cs
        if 4 * floats <= limit:
            return (("KC", kc), ("CS", cs), ("TS", ts))
    raise ValueError(f"chunk_pieces: C = {C} does not fit {limit} bytes of threadgroup memory")


# The forward's output O = diag(e^gamma) Q S + P U: "kernel" (chunk_output.metal, 8x8 products, O
# written in the op's output type) or "gemm" (chunk._output: MLX's GEMMs, float32). "auto": the
# kernel where its products may be BF16 (bfloat16 inputs on BF16_PRODUCT_BACKENDS), GEMMs elsewhere
# (float inputs: CUDA's GEMMs are TF32 by default, Metal's are MLX's own; neither measured against
# the kernel's FP64 / float products). H100, fifteenth session, ncu at (8, 2048, 32): the kernel 803
# us, the GEMM path's three kernels (P u, Q e^gamma, addmm; float32) 832 plus a float32 output
# layout; the op's forward 2-3% faster with the kernel at (4, 4096, 16) and (8, 2048, 32), level at
# (1, 8192, 16).
OUTPUT_KERNEL = "auto"
OUTPUT_STAGE_ROWS = 32  # chunk_output: rows of S (columns of Q) a stage
FACTORS_IN_BF16 = True  # see forward_types


def _output_config(C, K, V, limit, padded):
    """chunk_output.metal's value columns a threadgroup and template values (stage rows, padded
    strides): all V columns where its threadgroup memory (a stage, O's tile, or P) fits `limit`
    bytes, else the widest multiple of 16 dividing V that fits; None where none does."""
    ks = min(OUTPUT_STAGE_ROWS, K)
    pad = 4 if padded else 0
    for bv in range(min(V, 16 * 32), 0, -16):  # at most 32 SIMD groups
        if V % bv:
            continue
        sst, qst, ost, pst = bv + pad, ks + pad, bv + pad, C + pad
        if 4 * (max(ks * sst + C * qst, C * max(ost, pst)) + C) <= limit:
            return bv, (("KS", ks), ("SST", sst), ("QST", qst), ("OST", ost), ("PST", pst))
    return None


def _output_choice(C, K, V, bf16_products):
    """_output_config's values where OUTPUT_KERNEL takes the kernel and it applies (K, C multiples
    of 8, V of 16), else None. "auto" takes it only where a threadgroup covers all V columns
    (V <= ~180 at C = 64 on CUDA): the configuration measured."""
    wanted = OUTPUT_KERNEL == "kernel" or (OUTPUT_KERNEL == "auto" and _auto_bf16(bf16_products))
    if not wanted or K % 8 or V % 16 or C % 8:
        return None
    config = _output_config(C, K, V, *_threadgroup_memory())
    if config is None or (OUTPUT_KERNEL == "auto" and config[0] < V):
        return None
    return config


def forward_types(R, C, K, V, bf16_products):
    """The types the forward writes its intermediates in, (W, P, states and u): bfloat16 where the
    forward's reader rounds them to bfloat16 as factors anyway (BF16 products), so its results are
    the same with half the bytes; float32 elsewhere. W: read by the resident scan; P, the states
    and u (the scan's x_new): by the output kernel. The states and u also go to the backward, which
    then works from them in bfloat16 as fla's does (it recomputes h in bfloat16 and reads v_new in
    bfloat16). R: the scan's rows (batch x value heads). FACTORS_IN_BF16 = False keeps all float32;
    so does Metal (it multiplies in float whatever bf16_products says, and its SIMD-group loads
    and stores take float)."""
    rounds = FACTORS_IN_BF16 and bf16_products and backend() != "metal"
    rounded = lambda used: mx.bfloat16 if rounds and used else mx.float32
    output_kernel = _output_choice(C, K, V, bf16_products) is not None
    return (rounded(_resident_scan_choice(R, C, K, V, bf16_products)), rounded(output_kernel),
            rounded(output_kernel))


# Step 4 of the chunk pieces, W = T diag(beta e^gamma) K and U = T diag(beta) V: "kernel" (in
# chunk_pieces, SIMT float products) or "gemm" (chunk_pieces writes T in bfloat16 and MLX's batched
# GEMMs multiply bfloat16 factors into bfloat16 W and U, as fla's recompute_w_u), the latter for
# bfloat16 inputs where "auto" multiplies in BF16 (_auto_bf16), in the forward only. H100,
# seventeenth session (before PIECES_MMA): the op's forward level with "kernel" (3.37 against
# 3.34-3.37 ms at (8, 2048, 32)): the GEMMs take what the kernel gives back.
PIECES_WU = "kernel"


def pieces_wu_gemm(bf16_products):
    """Whether the forward's W and U come from bfloat16 GEMMs (PIECES_WU = "gemm", where it applies)."""
    return PIECES_WU == "gemm" and _auto_bf16(bf16_products)


# The forward's layout writes q (scaled) and k (L2-normalised) in bfloat16 for bfloat16 inputs where
# products are BF16 (forward_qk_type): fla's precision (it normalises q and k into bfloat16 and its
# kernels read them so), at half the bytes of the forward's largest arrays.
QK_IN_BF16 = True


def forward_qk_type(bf16_inputs):
    """The type the forward's layout writes q and an L2-normalised k in: bfloat16 for bfloat16
    inputs where "auto" multiplies in BF16 (_auto_bf16), with QK_IN_BF16; float32 elsewhere, and
    always for the backward's own layout (its gradients come from float32 q and k). The resident
    scan and the output kernel round them to bfloat16 anyway; the chunk pieces (K K^T, Q K^T, W)
    then start from the rounded values, as fla's do."""
    return mx.bfloat16 if QK_IN_BF16 and _auto_bf16(bf16_inputs) else mx.float32


def chunk_output(q, states, P, u, gamma, dtype, bf16_products, rows=None):
    """o = diag(e^gamma) q states + P u [N * B, HV, C, V] in dtype by chunk_output.metal, from
    chunk-major q [N * B, HV, C, K], states [..., K, V], P [..., C, C], u [..., C, V] (float32, or
    bfloat16 as forward_types gives them) and gamma [..., C, 1]; given rows = (src, B, T) (src:
    rows_to_chunks' map of the N C padded positions), o comes as token rows [B, T, HV, V] instead.
    None where OUTPUT_KERNEL leaves it to GEMMs or the kernel does not apply (_output_choice)."""
    _, HV, C, K = q.shape
    V = u.shape[-1]
    choice = _output_choice(C, K, V, bf16_products)
    if choice is None:
        return None
    bv, config = choice
    threads = 32 * (bv // 16)
    M = q.size // (C * K)
    src, dims = _row_maps(rows)
    shape = (*q.shape[:-1], V) if rows is None else (rows[1], rows[2], HV, V)
    return get_kernel("chunk_output", threads, bf16_products)(
        inputs=[q, states, P, u, gamma.reshape(M, C), src, dims],
        template=[("K", K), ("V", V), ("BV", bv), ("C", C), ("THREADS", threads), ("OutT", dtype),
                  ("QT", q.dtype), ("ST", states.dtype), ("PT", P.dtype),
                  *config, ("ROWS", rows is not None), ("HV", 1 if rows is None else HV)],
        grid=(threads * M, V // bv, 1), threadgroup=(threads, 1, 1),
        output_shapes=[shape], output_dtypes=[dtype])[0]


def _per_chunk_launch(q, v, config):
    """The shapes and launch arguments of a kernel with one threadgroup per chunk (chunk_pieces,
    chunk_grads) on chunk-major q [..., C, K] and v [..., C, V]: (lead, C, K, V, arguments), the
    kernel's template values from config(C, threadgroup bytes, padded)."""
    *lead, C, K = q.shape
    V = v.shape[-1]
    threads = max(PIECES_THREADS, -(-C // 32) * 32)
    extra = config(C, *_threadgroup_memory())
    return lead, C, K, V, dict(
        template=[("K", K), ("V", V), ("C", C), ("THREADS", threads), *extra],
        grid=(threads * (q.size // (C * K)), 1, 1), threadgroup=(threads, 1, 1))


# The forward's chunk pieces with bfloat16 inputs on CUDA (where "auto" multiplies in BF16): K K^T,
# Q K^T (step 1) and W, U (step 4) on 8x8 products with bfloat16 factors and float sums (fla's kkt
# and recompute_w_u precision), the inverse (step 3) exact as elsewhere. H100, seventeenth session,
# the op's bf16 forward: 3.08-3.14 ms against 3.27-3.33 with the float FMAs at (8, 2048, 32),
# 1.90 / 1.98 at (4, 4096, 16), 1.53-1.55 / 1.62-1.67 at (1, 8192, 16) (held to 4 threadgroups an
# SM: CUDA_MIN_THREADGROUPS; at 3, slower than the FMAs). With FP64 products instead the kernel was
# no faster than the FMAs and the backward's pieces 8% slower: elsewhere the FMAs stay.
PIECES_MMA = True


def pieces_mma(bf16_products):
    """Whether the forward's chunk pieces run steps 1 and 4 on BF16 8x8 products (PIECES_MMA)."""
    return PIECES_MMA and _auto_bf16(bf16_products)


def chunk_pieces(q, k, v, gamma, beta, all_pieces=True, types=(mx.float32, mx.float32), v_rows=None,
                 wu=True, mma=False):
    """The chunk pieces kernel on chunk-major q, k [N * B, HV, C, K], v [N * B, HV, C, V] (any float
    type), gamma, beta [..., C, 1] (float32): (KKG, P, Tinv, W, U) as chunk._pieces_before_inverse /
    _pieces_after_inverse give them, W and P in types (forward_types); KKG and Tinv None unless
    all_pieces (the forward needs neither: two C x C arrays a chunk not written). Given v_rows =
    (src, B, T) (src: rows_to_chunks' map of the N C padded positions), v is read from token rows
    [B, T, HV, V] instead (no layout pass over v). wu=False: W and U are not computed (None) and
    Tinv is written, in bfloat16 (the forward's caller multiplies: PIECES_WU). mma: K K^T, Q K^T, W
    and U as 8x8 products with bfloat16 factors (pieces_mma)."""
    w_type, p_type = types
    lead, C, K, V, launch = _per_chunk_launch(q, v, _pieces_config)
    src, dims = _row_maps(v_rows)
    t_type = mx.float32 if wu or all_pieces else mx.bfloat16
    launch["template"] += [("ALL_PIECES", all_pieces), ("WT", w_type), ("PT", p_type),
                           ("V_ROWS", v_rows is not None), ("HV", 1 if v_rows is None else q.shape[1]),
                           ("WU", wu), ("TT", t_type), ("MMA", mma),
                           ("QInT", q.dtype), ("KInT", k.dtype), ("VInT", v.dtype)]
    square = (*lead, C, C)
    placeholder = (1,)  # an output not written
    KKG, P, Tinv, W, U = get_kernel("chunk_pieces", launch["threadgroup"][0], mma)(
        inputs=[q, k, v, gamma, beta, src, dims],
        output_shapes=[square if all_pieces else placeholder, square,
                       square if all_pieces or not wu else placeholder,
                       (*lead, C, K) if wu else placeholder, (*lead, C, V) if wu else placeholder],
        output_dtypes=[mx.float32, p_type, t_type, w_type, mx.float32], **launch)
    return (KKG if all_pieces else None, P, Tinv if all_pieces or not wu else None,
            W if wu else None, U if wu else None)


def _row_maps(rows):
    """The src and dims inputs of a kernel that reads or writes token rows given rows = (src, B, T);
    placeholders for one that does not (src unread, dims[0] = B = 1)."""
    if rows is None:
        ones = constant(("int32 ones", 2), lambda: mx.ones((2,), dtype=mx.int32))
        return ones, ones
    src, B, T = rows
    return src, mx.array([B, T], dtype=mx.int32)


def _grads_config(C, limit, padded):
    """chunk_grads.metal's staged column block KC and row strides: the widest KC that fits `limit`."""
    cs = C + (4 if padded else 0)
    for kc in (16, 8, 4):
        if 4 * (max(4 * kc * cs, C * cs) + C * cs) <= limit:
            return (("KC", kc), ("CS", cs), ("TS", cs))
    raise ValueError(f"chunk_grads: C = {C} does not fit {limit} bytes of threadgroup memory")


def chunk_grads(q, k, v, do, u, du, du_h, dKt, dQg, Tinv, W, U, KKG, P, gamma, beta, dchunk):
    """The chunk grads kernel on chunk-major float32 arrays (q, k [..., C, K]; v, do, u, du
    [..., C, V]; C x C pieces; gamma, beta [..., C, 1]; dchunk one per chunk): (dq, dk, dv, dg, dbeta)
    as chunk._backward_after_scan gives them, from the GEMMs du_h = du h^T, dKt = u dh'^T, dQg = dO h^T."""
    lead, C, K, V, launch = _per_chunk_launch(q, v, _grads_config)
    return tuple(get_kernel("chunk_grads", launch["threadgroup"][0])(
        inputs=[q, k, v, do, u, du, du_h, dKt, dQg, Tinv, W, U, KKG, P, gamma, beta, dchunk],
        output_shapes=[(*lead, C, K)] * 2 + [(*lead, C, V)] + [(*lead, C, 1)] * 2,
        output_dtypes=[mx.float32] * 5, **launch))


LAYOUT_ROWS = 8  # rows_to_chunks / chunks_to_rows: SIMD groups per threadgroup
# rows_to_chunks: rows a SIMD group, their loads in flight together (H100, eighteenth session: the
# op's forward 2-4% faster than with 1 at (8, 2048, 32) and (4, 4096, 16), level at (1, 8192, 16))
LAYOUT_ROWS_PER_GROUP = 4


def rows_to_chunks(x, src, heads, C, *, scale=1.0, l2norm=False, dtype=mx.float32):
    """x [B, T, HX, D] -> chunk-major [N * B, heads, C, D] in dtype (heads a multiple of HX; head h
    reads x's head h // (heads / HX)), row p of a batch row from token src[p] (zeros where -1),
    times scale, L2-normalised first with l2norm. src: int32 [N * C]."""
    B, T, HX, D = x.shape
    NC = src.shape[0]
    groups = -(-NC * B * heads // LAYOUT_ROWS_PER_GROUP)
    return get_kernel("rows_to_chunks")(
        inputs=[x, src, mx.array([scale], dtype=mx.float32), mx.array([T, B, NC], dtype=mx.int32)],
        template=[("InT", x.dtype), ("OutT", dtype), ("D", D), ("HX", HX), ("HV", heads), ("C", C),
                  ("L2NORM", l2norm), ("RPS", LAYOUT_ROWS_PER_GROUP)],
        grid=(32 * groups, 1, 1), threadgroup=(32 * LAYOUT_ROWS, 1, 1),
        output_shapes=[(NC // C * B, heads, C, D)], output_dtypes=[dtype])[0]


def chunks_to_rows(y, dst, B, heads, dtype, *, scale=1.0, x=None):
    """Chunk-major y [N * B, HV, C, D] (float32, or chunk_output's type) -> [B, T, heads, D] in
    dtype, token t from padded position dst[t] (int32 [T]), the HV / heads value heads of each head
    summed, times scale. Given the raw rows x [B, T, heads, D], the VJP of rows_to_chunks' L2 norm is
    applied (y its cotangent)."""
    _, HV, C, D = y.shape
    T = dst.shape[0]
    rows = B * T * heads
    return get_kernel("chunks_to_rows")(
        inputs=[y, mx.zeros((1,), dtype=dtype) if x is None else x, dst,
                mx.array([scale], dtype=mx.float32), mx.array([T, B], dtype=mx.int32)],
        template=[("OutT", dtype), ("XT", dtype if x is None else x.dtype), ("D", D), ("HX", heads),
                  ("HV", HV), ("C", C), ("L2NORM", x is not None)],
        grid=(32 * rows, 1, 1), threadgroup=(32 * LAYOUT_ROWS, 1, 1),
        output_shapes=[(B, T, heads, D)], output_dtypes=[dtype])[0]


_constants = {}


def constant(key, make):
    """make(), evaluated once and cached under key: masks, and the decode step's small inputs, which
    it would otherwise build and copy to the device at every call (on the CPU path, reshaping a
    pending array would also stall the streams)."""
    if key not in _constants:
        _constants[key] = make()
        mx.eval(_constants[key])
    return _constants[key]


def zeros(n):
    """float32 zeros of length n (absent gate parameters)."""
    return constant(("zeros", n), lambda: mx.zeros((n,)))


ZERO_STATES_CACHED = 1 << 24  # floats (64 MB): the largest zero state kept between calls


def zero_states(n, heads, K, V):
    """float32 zeros [n, heads, K, V], the absent initial state: the first n of one buffer kept for
    (heads, K, V) and grown to the largest n asked (a slice along the first axis is a view: no
    copy), instead of filling n K V floats every call (H100, (8, 2048, 32, 128): a 23-40 us kernel
    of the forward's ~2.2 ms). Fresh zeros past ZERO_STATES_CACHED floats."""
    if n * heads * K * V > ZERO_STATES_CACHED:
        return mx.zeros((n, heads, K, V))
    key = ("zero states", heads, K, V)
    if key in _constants and _constants[key].shape[0] < n:
        del _constants[key]  # grown below
    kept = constant(key, lambda: mx.zeros((n, heads, K, V)))
    return kept if kept.shape[0] == n else kept[:n]


def _scalar(value):
    return constant(("scalar", float(value)), lambda: mx.array([value], dtype=mx.float32))


def decode_step(q, k, v, g, beta, state, *, scale, A_log=None, dt_bias=None, l2norm=False,
                gate=False, beta_sigmoid=False, neg_eigval=False):
    """The fused recurrent step: raw inputs in (q, k [B,T,H,K]; v [B,T,HV,V]; g, beta [B,T,HV];
    state [B,HV,K,V] float32), the in-kernel options applied inside. Returns (o in q's dtype, state)."""
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    A_log = zeros(HV) if A_log is None else A_log.astype(mx.float32)
    has_bias = dt_bias is not None
    dt_bias = dt_bias.astype(mx.float32) if has_bias else zeros(HV)
    dtype = q.dtype
    # g and beta go in as they are (the kernel reads each in its own type; GateT and BetaT name the
    # types so that each pair compiles its own kernel): a decode step launches nothing but the kernel
    o, state_out = get_kernel("decode_step")(
        inputs=[q, k.astype(dtype), v.astype(dtype), g, beta, A_log, dt_bias, _scalar(scale),
                state.astype(mx.float32)],
        template=[("InT", dtype), ("GateT", g.dtype), ("BetaT", beta.dtype), ("K", K), ("V", V),
                  ("HQ", H), ("HV", HV), ("T", T),
                  ("L2NORM", l2norm), ("GATE", gate), ("HAS_DT_BIAS", has_bias),
                  ("BETA_SIGMOID", beta_sigmoid), ("NEG_EIGVAL", neg_eigval)],
        grid=(32, V, B * HV), threadgroup=(32, min(TG_COLUMNS, V), 1),
        output_shapes=[(B, T, HV, V), (B, HV, K, V)], output_dtypes=[dtype, mx.float32])
    return o, state_out
