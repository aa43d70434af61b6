"""The gated delta rule in chunks (WY/UT form), with a hand-written backward.

Layout inside this module is chunk-major: q, k [N * B, HV, C, K]; v [N * B, HV, C, V]; g, beta
[N * B, HV, C, 1] (chunk n of batch row b at n * B + b); every batched matmul runs over all chunks
and heads at once and only the scan over the N chunks is sequential. Per chunk, with gamma the within-chunk cumsum of g and
Gam_ij = exp(gamma_i - gamma_j) (i >= j, else 0):

    A = strict_tril(diag(beta) (K K^T) * Gam)      Tinv = (I + A)^-1
    W = Tinv diag(beta e^gamma) K                   U = Tinv diag(beta) V
    u = U - W h                                     (the chunk's "new values")
    h' = e^{gamma_C} h + (K * e^{gamma_C - gamma})^T u
    O = (Q * e^gamma) h + tril((Q K^T) * Gam) u

The backward recomputes the per-chunk pieces (C x C matrices, W, U), keeps one K x V state per chunk
(never one per token), and runs the reverse scan for dh. Sequences of a packed batch (`segments`)
occupy consecutive chunks; the scans restart at each segment's first chunk. Both passes go through
blocks of BLOCK_TOKENS (forward) / BACKWARD_BLOCK_TOKENS tokens, the scan state carried between
blocks, to bound memory at long T.
On Metal/CUDA the chunk pieces, the two scans and the backward's work after the reverse scan are
kernels of metal_kernels/ (see kernels.py), and so is the output where kernels.chunk_output takes
it. gated_delta.py pairs chunk_forward and chunk_backward in one custom function over token rows.
"""

import os

import mlx.core as mx

from . import kernels

BASE_BLOCK = 16  # size of the diagonal blocks inverted by the nilpotent product
DECAY_BLOCK = 16  # _decay_matrix's blocks: exponentials within them, products of three across
# The batched (non-sequential) work runs this many tokens at a time, one block finished before the
# next starts, so temporaries stay bounded at any T.
BLOCK_TOKENS = 2048  # forward
BACKWARD_BLOCK_TOKENS = 1024  # the backward keeps more per token: smaller blocks
# With the kernels (a GPU) each launch costs more than its work at these sizes: blocks 8x longer
# (H100, (1, 8192, 16, 128): fwd 7.1 -> 5.8 ms, fwd+bwd 21 -> 15 ms).
KERNEL_BLOCK_SCALE = 8


def token_floats(HV, C, K, V):
    """About the floats a token takes in a block's temporaries (C x C matrices, K and V rows)."""
    return HV * (8 * C + 6 * (K + V))


# The block sizes above hold for heads this wide (16 value heads, K = V = 128, C = 64); narrower heads
# get a whole multiple more tokens a block, for about the same memory. Where heads are small the
# number of ops, not their size, sets the time: tiny-gdn's heads (2 x 16 x 32) then run 2048 tokens
# backward as one block instead of two (this CPU, OpenBLAS: a compiled value_and_grad 151-167 ->
# 132-147 ms, peak 77 -> 96 MB). 0 turns the scaling off.
REFERENCE_TOKEN_FLOATS = token_floats(16, 64, 128, 128)


def _block_tokens(tokens, HV, C, K, V):
    if REFERENCE_TOKEN_FLOATS:
        tokens *= max(1, REFERENCE_TOKEN_FLOATS // token_floats(HV, C, K, V))
    return tokens if kernels.backend() == "ops" else tokens * KERNEL_BLOCK_SCALE


def _t(x):
    return mx.swapaxes(x, -1, -2)


def _mm_nt(a, b):
    # a @ b^T. MLX's CPU GEMM runs twice as slow on a transposed right operand; a copy is cheaper
    # there. GPU GEMMs take the transposed view as it is.
    return a @ (mx.contiguous(_t(b)) if kernels.backend() == "ops" else _t(b))


def _masks(C):
    """(i >= j, i > j) over a chunk, evaluated constants."""
    def make():
        i = mx.arange(C)
        return i[:, None] >= i[None, :], i[:, None] > i[None, :]

    return kernels.constant(("masks", C), make)


def _decay_matrix(gamma, incl):
    """exp(gamma_i - gamma_j) on i >= j, else 0 (gamma a non-increasing column [..., C, 1]).

    In blocks of DECAY_BLOCK tokens: within a diagonal block directly; below it as the product
    exp(gamma_i - gamma_first(I)) exp(gamma_first(I) - gamma_last(J)) exp(gamma_last(J) - gamma_j),
    three factors <= 1 (so nothing overflows), from 2C + (C / DECAY_BLOCK)^2 exponentials instead of
    C^2: MLX's CPU exp (~12 ns an element on Linux) made the C x C form most of the chunk pieces'
    time. The exponent of a masked entry is replaced *before* exp: no inf is formed, none multiplied.
    """
    C, S = gamma.shape[-2], DECAY_BLOCK
    if C <= S or C % S:
        return mx.exp(mx.where(incl, gamma - _t(gamma), -mx.inf))
    lead, nb = gamma.shape[:-2], C // S
    gb = gamma.reshape(*lead, nb, S, 1)
    first, last = gb[..., :1, :], gb[..., -1:, :]  # [..., nb, 1, 1]
    diag = mx.exp(mx.where(incl[:S, :S], gb - _t(gb), -mx.inf))  # [..., nb, S, S]
    below = _masks(nb)[1]  # block I > block J
    cross = mx.exp(mx.where(below, first.reshape(*lead, nb, 1) - last.reshape(*lead, 1, nb), -mx.inf))
    off = (mx.exp(gb - first).reshape(*lead, nb, S, 1, 1) * cross.reshape(*lead, nb, 1, nb, 1)
           * mx.exp(last - gb).reshape(*lead, 1, 1, nb, S))
    return mx.where(_block_diagonal(nb), diag.reshape(*lead, nb, S, 1, S), off).reshape(*lead, C, C)


def _block_diagonal(nb):
    """(I == J) as [nb, 1, nb, 1] over blocks I, J, an evaluated constant."""
    return kernels.constant(("block diagonal", nb), lambda: mx.eye(nb, dtype=mx.bool_).reshape(nb, 1, nb, 1))


def invert_unit_lower(A):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a power of two.

    Blocks of 16 use (I+A)^-1 = (I-A)(I+A^2)(I+A^4)(I+A^8) (A^16 = 0); larger sizes merge two halves
    with T21 = -T22 A21 T11. About C^3/2 flops instead of the C^3 log C of squaring the whole chunk.
    """
    C = A.shape[-1]
    if C <= BASE_BLOCK:
        eye = mx.eye(C, dtype=A.dtype)
        inv = eye - A
        power, p = A, 2
        while p < C:
            power = power @ power
            inv = inv + inv @ power
            p *= 2
        return inv
    h = C // 2
    t11 = invert_unit_lower(A[..., :h, :h])
    t22 = invert_unit_lower(A[..., h:, h:])
    t21 = -(t22 @ (A[..., h:, :h] @ t11))
    top = mx.concatenate([t11, mx.zeros_like(t11)], axis=-1)
    return mx.concatenate([top, mx.concatenate([t21, t22], axis=-1)], axis=-2)


COMPILE = os.environ.get("MLX_GDN_COMPILE", "1") != "0"
COMPILE_ON_CPU = False  # the tests set it: the compiled functions checked without a GPU
_compiled = {}
kernels.forget_with_kernels.append(lambda: _compiled)


def compiling():
    """Whether functions run under mx.compile: on Metal/CUDA (MLX_GDN_COMPILE=0 turns it off), and on
    the CPU where the tests set COMPILE_ON_CPU."""
    return COMPILE and (kernels.backend() in ("metal", "cuda") or COMPILE_ON_CPU)


def fused(fn):
    """fn under mx.compile on a GPU, where fusing its element-wise chains saves launches and memory
    traffic; as is on the CPU path (see compiling())."""
    if not compiling():
        return fn
    if fn not in _compiled:
        _compiled[fn] = mx.compile(fn)
    return _compiled[fn]


def _gates(g):
    """Per-token decays: gamma (the within-chunk cumsum of g), e^gamma, the decay to the chunk's end,
    and the decay across the whole chunk [..., 1, 1]."""
    gamma = mx.cumsum(g, axis=-2)  # [..., C, 1]
    glast = gamma[..., -1:, :]
    return gamma, mx.exp(gamma), mx.exp(glast - gamma), mx.exp(glast)


def _pieces_before_inverse(q, k, gamma, beta, incl, strict):
    Gam = _decay_matrix(gamma, incl)
    KKG = mx.where(strict, _mm_nt(k, k) * Gam, 0.0)
    P = mx.where(incl, _mm_nt(q, k) * Gam, 0.0)
    return Gam, KKG, KKG * beta, P


def _pieces_after_inverse(Tinv, k, v, beta, eg):
    return Tinv @ (k * (beta * eg)), Tinv @ (v * beta)


def _pieces_after_inverse_bf16(Tinv, k, v, beta, eg):
    """_pieces_after_inverse as fla's recompute_w_u computes it: bfloat16 factors (Tinv comes so),
    float sums, W and U in bfloat16."""
    return Tinv @ (k * (beta * eg)).astype(mx.bfloat16), Tinv @ (v * beta).astype(mx.bfloat16)


def _gated_from_kernel(gamma, KKG, beta, incl):
    return _decay_matrix(gamma, incl), KKG * beta


class _ChunkPieces:
    """The per-chunk quantities both passes derive from q, k, v, g, beta (cheap to recompute).

    Per-token scalars are kept as columns [..., C, 1] and broadcast from there: MLX's CPU scheduler
    waits for a pending input before reshaping it, which would serialise the per-core streams.
    On a GPU, metal_kernels/chunk_pieces.metal computes KKG, P, Tinv, W and U in one launch (KKG and
    Tinv only with all_pieces: the forward needs neither); Gam and A are then only formed if a
    reader asks for them (MLX evaluates lazily), and the scan kernels take k and gamma instead of Kt
    (the ops path's K scaled by the decay to the chunk's end).
    """

    KEPT = ("KKG", "P", "Tinv", "W", "U")  # what the backward can take from the forward instead

    def __init__(self, q, k, v, g, beta, kept=(), all_pieces=True, types=(mx.float32, mx.float32),
                 v_rows=None, wu_gemm=False, mma=False):
        C = q.shape[-2]
        self.incl, self.strict = _masks(C)
        self.gamma, self.eg, self.tail, self.decay = fused(_gates)(g)
        if kernels.backend() == "ops":
            self.Kt = k * self.tail
            if not kept:
                self.Gam, self.KKG, self.A, self.P = fused(_pieces_before_inverse)(
                    q, k, self.gamma, beta, self.incl, self.strict)
                self.Tinv = invert_unit_lower(self.A)
                self.W, self.U = fused(_pieces_after_inverse)(self.Tinv, k, v, beta, self.eg)
                return
        if wu_gemm:  # W and U as bfloat16 GEMMs (kernels.PIECES_WU), from v laid out in chunks
            if v_rows is not None:
                v, v_rows = kernels.rows_to_chunks(v, v_rows[0], q.shape[1], C, dtype=v.dtype), None
        self.KKG, self.P, self.Tinv, self.W, self.U = kept or kernels.chunk_pieces(
            q, k, v, self.gamma, beta, all_pieces, types, v_rows, not wu_gemm, mma)
        if wu_gemm:
            self.W, self.U = fused(_pieces_after_inverse_bf16)(self.Tinv, k, v, beta, self.eg)
        if self.KKG is not None:
            self.Gam, self.A = fused(_gated_from_kernel)(self.gamma, self.KKG, beta, self.incl)


def _scan_forward(W, U, Kt, decay, h0, segments):
    """h_{n+1} = decay_n h_n + Kt_n^T (U_n - W_n h_n), restarting at each segment from h0.

    Arrays are [N * nb, HV, ...] with chunk n's rows at n * nb ... (n + 1) * nb; so is h0 per segment.
    """
    nb = h0.shape[0] // len(segments)
    states, new_values, finals = [], [], []
    for s, (c0, c1) in enumerate(segments):
        h = h0[s * nb:(s + 1) * nb]
        for n in range(c0, c1):
            rows = slice(n * nb, (n + 1) * nb)
            states.append(h)
            u = U[rows] - W[rows] @ h
            new_values.append(u)
            h = decay[rows] * h + _t(Kt[rows]) @ u
        finals.append(h)
    return mx.concatenate(states), mx.concatenate(new_values), mx.concatenate(finals)


def _scan_backward(PdO, QdO, Kt, W, decay, dhT, segments):
    """Reverse scan: du_n = PdO_n + Kt_n dh_{n+1};  dh_n = decay_n dh_{n+1} + QdO_n - W_n^T du_n."""
    nb = dhT.shape[0] // len(segments)
    N = W.shape[0] // nb
    du, dh_next = [None] * N, [None] * N
    dh0 = [None] * len(segments)
    for s in range(len(segments) - 1, -1, -1):
        c0, c1 = segments[s]
        dh = dhT[s * nb:(s + 1) * nb]
        for n in range(c1 - 1, c0 - 1, -1):
            rows = slice(n * nb, (n + 1) * nb)
            dh_next[n] = dh
            du[n] = PdO[rows] + Kt[rows] @ dh
            dh = decay[rows] * dh + QdO[rows] - _t(W[rows]) @ du[n]
        dh0[s] = dh
    return mx.concatenate(du), mx.concatenate(dh_next), mx.concatenate(dh0)


def _forward_block(q, k, v, g, beta, h0, segments, keep=False, out_dtype=mx.float32, to_rows=None):
    """One block of chunks: (o, final states, per-chunk start states, new values u), then with
    `keep` the pieces the backward would otherwise compute again (_ChunkPieces.KEPT). o is float32,
    or out_dtype where the output kernel writes it (kernels.chunk_output); chunk-major, or given
    to_rows = (src, dst, B, T) (kernels.rows_to_chunks' maps; the block is the whole input, and v
    comes in token rows [B, T, HV, V]) token rows in out_dtype. The states and u are float32, or
    bfloat16 where kernels.forward_types says."""
    bf16_products = v.dtype == mx.bfloat16
    w_type = p_type = state_type = mx.float32
    if kernels.backend() != "ops":
        (_, HV, C, K), V = q.shape, v.shape[-1]
        w_type, p_type, state_type = kernels.forward_types(h0.shape[0] // len(segments) * HV, C, K, V,
                                                           bf16_products)
        if keep:  # kept pieces go to the backward in float32
            w_type = p_type = mx.float32
    rows = None if to_rows is None else (to_rows[0], *to_rows[2:])  # (src, B, T) for the kernels
    forward_only = kernels.backend() != "ops" and not keep  # kept pieces: the backward's precision
    pc = _ChunkPieces(q, k, v, g, beta, all_pieces=keep, types=(w_type, p_type), v_rows=rows,
                      wu_gemm=forward_only and kernels.pieces_wu_gemm(bf16_products),
                      mma=forward_only and kernels.pieces_mma(bf16_products))
    o = None
    if kernels.backend() == "ops":
        states, u, hT = _scan_forward(pc.W, pc.U, pc.Kt, pc.decay, h0, segments)
    else:
        states, u, hT = kernels.scan_forward(pc.W, pc.U, k, pc.gamma, h0, segments, bf16_products,
                                             state_type)
        o = kernels.chunk_output(q, states, pc.P, u, pc.gamma, out_dtype, bf16_products, rows)
    if o is None:  # the GEMMs, chunk-major
        o = fused(_output)(q, pc.eg, states, pc.P, u)
        if to_rows is not None:
            o = _rows(o, to_rows, out_dtype)
    return (o, hT, states, u) + (tuple(getattr(pc, name) for name in pc.KEPT) if keep else ())


def _rows(o, to_rows, dtype):
    """Chunk-major o [N * B, HV, C, V] -> token rows [B, T, HV, V] in dtype (to_rows as in
    _forward_block)."""
    _, dst, B, _ = to_rows
    return kernels.chunks_to_rows(o, dst, B, o.shape[1], dtype)


def _output(q, eg, states, P, u):
    # the sum inside the GEMM (addmm): one pass less over the output (H100: 0.58 -> 0.51 ms at
    # (1, 8192, 9, 200, 400))
    return mx.addmm(P @ u, q * eg, states)


def _backward_block(q, k, v, g, beta, do, dhT, states, u, segments, kept=()):
    """One block of chunks: gradients (dq, dk, dv, dg, dbeta, dh0) of _forward_block's (o, hT);
    `kept`, the pieces _forward_block kept, if it did."""
    pc = _ChunkPieces(q, k, v, g, beta, kept)
    Qg, PdO, QdO = fused(_scan_backward_inputs)(q, pc.eg, pc.P, do)
    if kernels.backend() != "ops":
        du, dh_next, dh0 = kernels.scan_backward(PdO, QdO, k, pc.W, pc.gamma, dhT, segments,
                                                 v.dtype == mx.bfloat16)
        return _backward_after_scan_kernel(q, k, v, beta, do, states, u, du, dh_next, pc) + (dh0,)
    du, dh_next, dh0 = _scan_backward(PdO, QdO, pc.Kt, pc.W, pc.decay, dhT, segments)
    return tuple(fused(_backward_after_scan)(
        q, k, v, beta, do, states, u, du, dh_next, Qg, pc.incl, pc.strict, pc.Gam, pc.eg, pc.tail,
        pc.decay, pc.KKG, pc.A, pc.P, pc.Tinv, pc.W, pc.U, pc.Kt)) + (dh0,)


def _scan_backward_inputs(q, eg, P, do):
    Qg = q * eg
    return Qg, _t(P) @ do, _t(Qg) @ do


def _backward_after_scan(q, k, v, beta, do, states, u, du, dh_next, Qg, incl, strict, Gam, eg, tail,
                         decay, KKG, A, P, Tinv, W, U, Kt):
    """(dq, dk, dv, dg, dbeta) from the reverse scan's du and dh_next and the chunk pieces."""
    # through u = U - W h and the state update h' = decay h + Kt^T u
    dW = -_mm_nt(du, states)
    dKt = _mm_nt(u, dh_next)
    dQg = _mm_nt(do, states)
    dP = mx.where(incl, _mm_nt(do, u), 0.0)
    # through W = Tinv Kb, U = Tinv Vb, Tinv = (I + A)^-1:  dA = -Tinv^T (dW Kb^T + dU Vb^T) Tinv^T
    # = -(dKb W^T + dVb U^T), with dKb = Tinv^T dW and dVb = Tinv^T dU.
    dKb = _t(Tinv) @ dW
    dVb = _t(Tinv) @ du
    dA = mx.where(strict, -(_mm_nt(dKb, W) + _mm_nt(dVb, U)), 0.0)

    dPG = dP * Gam  # cotangent of Q K^T
    dKK = dA * Gam * beta  # cotangent of K K^T (strict lower)
    dq = dQg * eg + dPG @ k
    dk = _t(dPG) @ q + dKt * tail + dKb * (beta * eg) + (dKK + _t(dKK)) @ k
    dv = dVb * beta

    dKb_k = mx.sum(dKb * k, axis=-1, keepdims=True)  # cotangent of beta * e^gamma
    dbeta = (mx.sum(dVb * v, axis=-1, keepdims=True) + eg * dKb_k
             + mx.sum(dA * KKG, axis=-1, keepdims=True))

    # dg_t = sum_{s >= t} dgamma_s (gamma = cumsum(g) within the chunk). gamma enters through e^gamma
    # (Qg, Kb), the chunk decay, and differences gamma_i - gamma_j (Gam in P and A, the tail decay in
    # Kt). A difference term's suffix sum is a block sum with i >= t > j: summed in that form, not as
    # rowsum - colsum, so nothing cancels in float32.
    zKt = mx.sum(dKt * Kt, axis=-1, keepdims=True)
    dgamma = mx.sum(dQg * Qg, axis=-1, keepdims=True) + beta * eg * dKb_k
    dchunk = _chunk_decay_grad(states, dh_next, decay)
    rows_below = mx.cumsum(dP * P + dA * A, axis=-2, reverse=True)  # [t, j] = sum_{i >= t}
    dg = (mx.cumsum(dgamma, axis=-2, reverse=True) + dchunk
          + mx.sum(mx.where(strict, rows_below, 0.0), axis=-1, keepdims=True)
          + mx.cumsum(zKt, axis=-2) - zKt)
    return dq, dk, dv, dg, dbeta


def _backward_after_scan_kernel(q, k, v, beta, do, states, u, du, dh_next, pc):
    """_backward_after_scan on a GPU: the three products with the K x V states as GEMMs, the rest in
    metal_kernels/chunk_grads.metal."""
    states = states.astype(mx.float32)  # bfloat16 where forward_types says: converted once, not per GEMM
    du_h, dKt, dQg = _mm_nt(du, states), _mm_nt(u, dh_next), _mm_nt(do, states)
    dchunk = fused(_chunk_decay_grad)(states, dh_next, pc.decay)
    return kernels.chunk_grads(q, k, v, do, u, du, du_h, dKt, dQg, pc.Tinv, pc.W, pc.U, pc.KKG, pc.P,
                               pc.gamma, beta, dchunk)


def _chunk_decay_grad(states, dh_next, decay):
    return decay * mx.sum(states * dh_next, axis=(-2, -1), keepdims=True)


_cpu_streams = []


def _over_head_groups(fn, inputs):
    """Run fn on groups of value heads, one CPU stream (thread) per group, and concatenate.

    MLX runs each CPU stream on its own thread but one GEMM on one core; heads are independent, so
    splitting them over the cores is the parallelism the CPU build leaves on the table. On a GPU
    (or one core) this is a plain call.
    """
    heads = inputs[0].shape[1]  # every array here is [rows, HV, ...]
    parts = min(heads, os.cpu_count() or 1)
    if mx.default_device() != mx.cpu or parts < 2 or kernels.backend() != "ops":
        return fn(*inputs)
    while len(_cpu_streams) < parts:
        _cpu_streams.append(mx.new_stream(mx.cpu))
    bounds = [heads * i // parts for i in range(parts + 1)]
    results = []
    for stream, lo, hi in zip(_cpu_streams, bounds, bounds[1:]):
        with mx.stream(stream):
            results.append(fn(*(x[:, lo:hi] for x in inputs)))
    return tuple(mx.concatenate(outs, axis=1) for outs in zip(*results))


def _blocks(N, C, segments, tokens):
    """Blocks of at most `tokens` tokens, each with its pieces of segments:
    (first chunk, end chunk, [(segment, local start, local end, starts here, ends here)])."""
    per = max(1, tokens // C)
    blocks = []
    for b0 in range(0, N, per):
        b1 = min(N, b0 + per)
        pieces = [(s, max(c0, b0) - b0, min(c1, b1) - b0, c0 >= b0, c1 <= b1)
                  for s, (c0, c1) in enumerate(segments) if max(c0, b0) < min(c1, b1)]
        blocks.append((b0, b1, pieces))
    return blocks


def _one_array(arrays):
    """Copies arrays into one flat array per dtype and returns views of them: all of a block's
    results then come from a node or two, so MLX's depth-first evaluation finishes (and frees) one
    block before the next. (mx.eval per block would not free anything under mx.grad, where arrays
    keep their graph.) One per dtype: concatenated together, bfloat16 arrays would come back float32."""
    views = [None] * len(arrays)
    for dtype in dict.fromkeys(a.dtype for a in arrays):  # in order of first appearance
        group = [i for i, a in enumerate(arrays) if a.dtype == dtype]
        flat, at = mx.concatenate([arrays[i].reshape(-1) for i in group]), 0
        for i in group:
            views[i] = flat[at:at + arrays[i].size].reshape(arrays[i].shape)
            at += arrays[i].size
    return views


def chunk_forward(q, k, v, g, beta, h0, segments, keep=False, out_dtype=mx.float32, to_rows=None):
    """Block by block (the scan state carried across): (o, final states, per-chunk start states, u,
    kept), kept the chunk pieces for chunk_backward with `keep` (more memory, a faster backward),
    else (). o is chunk-major, float32 or out_dtype (the op's output type) where a kernel writes
    it. Given to_rows = (src, dst, B, T), the maps of kernels.rows_to_chunks (GPU), v comes in token
    rows [B, T, HV, V] and so does o, in out_dtype: where the input is one block, the chunk pieces
    read v and the output kernel writes o as they are (no layout passes)."""
    nb = h0.shape[0] // len(segments)
    HV, C, K = q.shape[1:]
    blocks = _blocks(q.shape[0] // nb, C, segments, _block_tokens(BLOCK_TOKENS, HV, C, K, v.shape[-1]))
    outs, finals, carry = [], [None] * len(segments), None
    whole = to_rows if len(blocks) == 1 else None  # the one block reads v and writes o as rows
    if to_rows is not None and whole is None:
        v = kernels.rows_to_chunks(v, to_rows[0], HV, C, dtype=v.dtype)
    for b0, b1, pieces in blocks:
        rows = slice(b0 * nb, b1 * nb)
        starts = mx.concatenate([h0[s * nb:(s + 1) * nb] if first else carry
                                 for s, _, _, first, _ in pieces])
        local = tuple((lo, hi) for _, lo, hi, _, _ in pieces)
        o, ends, *for_backward = _over_head_groups(  # states, u (and the pieces with keep)
            lambda *xs: _forward_block(*xs, local, keep, out_dtype, whole),
            (q[rows], k[rows], v if whole else v[rows], g[rows], beta[rows], starts))
        if len(blocks) > 1:
            o, ends, *for_backward = _one_array((o, ends, *for_backward))
        for i, (s, _, _, _, last) in enumerate(pieces):
            if last:
                finals[s] = ends[i * nb:(i + 1) * nb]
            else:
                carry = ends[i * nb:(i + 1) * nb]
        outs.append((o, *for_backward))
    o, states, u, *kept = (mx.concatenate(x) for x in zip(*outs))
    if to_rows is not None and whole is None:
        o = _rows(o, to_rows, out_dtype)
    return o, mx.concatenate(finals), states, u, tuple(kept)


def chunk_backward(q, k, v, g, beta, segments, do, dhT, states, u, kept=()):
    """Gradients (dq, dk, dv, dg, dbeta, dh0) of chunk_forward's (o, hT), blocks in reverse; `kept`,
    the chunk pieces chunk_forward kept, if it did."""
    nb = dhT.shape[0] // len(segments)
    HV, C, K = q.shape[1:]
    blocks = _blocks(q.shape[0] // nb, C, segments,
                     _block_tokens(BACKWARD_BLOCK_TOKENS, HV, C, K, v.shape[-1]))
    grads, dh0, carry = [], [None] * len(segments), None
    for b0, b1, pieces in reversed(blocks):
        rows = slice(b0 * nb, b1 * nb)
        ends = mx.concatenate([dhT[s * nb:(s + 1) * nb] if last else carry
                               for s, _, _, _, last in pieces])
        local = tuple((lo, hi) for _, lo, hi, _, _ in pieces)
        *block_grads, dstarts = _over_head_groups(
            lambda *xs: _backward_block(*xs[:9], local, xs[9:]),
            (q[rows], k[rows], v[rows], g[rows], beta[rows], do[rows], ends, states[rows], u[rows],
             *(x[rows] for x in kept)))
        if len(blocks) > 1:
            *block_grads, dstarts = _one_array(tuple(block_grads) + (dstarts,))
        for i, (s, _, _, first, _) in enumerate(pieces):
            if first:
                dh0[s] = dstarts[i * nb:(i + 1) * nb]
            else:
                carry = dstarts[i * nb:(i + 1) * nb]
        grads.append(block_grads)
    return tuple(mx.concatenate(x) for x in zip(*reversed(grads))) + (mx.concatenate(dh0),)

