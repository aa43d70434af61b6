"""`gated_delta_rule`: fla's `chunk_gated_delta_rule` interface over the recurrent and chunked paths."""

import mlx.core as mx

from . import chunk, kernels
from .chunk import chunk_backward, chunk_forward, fused
from .recurrent import recurrent_gated_delta

CHUNK_SIZES = (16, 32, 64)
MODES = ("auto", "chunk", "recurrent")
FLOAT_DTYPES = (mx.float32, mx.bfloat16, mx.float16)
# mode="auto" takes the token loop up to this many tokens per sequence (decode, short prompts)
RECURRENT_MAX_TOKENS = 16


def _fail(name, expected, got):
    raise ValueError(f"gated_delta_rule: `{name}` must be {expected}, got {got}")


def _check_shape(name, x, expected):
    if tuple(x.shape) != tuple(expected):
        _fail(name, f"of shape {tuple(expected)}", tuple(x.shape))


def _check_inputs(q, k, v, g, beta, initial_state, A_log, dt_bias, use_gate_in_kernel,
                  state_v_first, cu_seqlens, chunk_size, mode):
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(x, mx.array):
            _fail(name, "an mx.array", type(x).__name__)
        if x.dtype not in FLOAT_DTYPES:
            _fail(name, "float32, bfloat16 or float16", x.dtype)
    if q.ndim != 4:
        _fail("q", "4-D [B, T, H, K]", f"shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    _check_shape("k", k, q.shape)
    if v.ndim != 4 or tuple(v.shape[:2]) != (B, T):
        _fail("v", f"4-D [B, T, HV, V] with B, T = {B}, {T}", f"shape {tuple(v.shape)}")
    HV, V = v.shape[2], v.shape[3]
    if HV % H != 0:
        _fail("v", f"a number of value heads HV divisible by the {H} q/k heads", f"HV = {HV}")
    if T == 0:
        _fail("q", "at least one token (T >= 1)", "T = 0")
    _check_shape("g", g, (B, T, HV))
    _check_shape("beta", beta, (B, T, HV))
    if use_gate_in_kernel:
        if A_log is None:
            _fail("A_log", "given when use_gate_in_kernel=True", None)
        _check_shape("A_log", A_log, (HV,))
        if dt_bias is not None:
            _check_shape("dt_bias", dt_bias, (HV,))
    if chunk_size not in CHUNK_SIZES:
        _fail("chunk_size", f"one of {CHUNK_SIZES}", chunk_size)
    if mode not in MODES:
        _fail("mode", f"one of {MODES}", repr(mode))

    seqs = [(0, T)] * B
    if cu_seqlens is not None:
        if B != 1:
            _fail("q", "of batch size 1 when cu_seqlens is given (packed sequences)", f"B = {B}")
        bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, mx.array) else list(cu_seqlens)
        if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T
                or any(b <= a for a, b in zip(bounds, bounds[1:]))):
            _fail("cu_seqlens", f"strictly increasing offsets from 0 to T = {T}", bounds)
        seqs = [(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]
    if initial_state is not None:
        state_shape = (len(seqs), HV, V, K) if state_v_first else (len(seqs), HV, K, V)
        layout = "[N, HV, V, K]" if state_v_first else "[N, HV, K, V]"
        if tuple(initial_state.shape) != state_shape:
            _fail("initial_state", f"{layout} = {state_shape}", tuple(initial_state.shape))
    return seqs


def l2_normalize(x, eps=1e-6):
    return x * mx.rsqrt(mx.sum(x * x, axis=-1, keepdims=True) + eps)


def gate_from_parameters(a, A_log, dt_bias=None):
    """fla's in-kernel gate g = -exp(A_log) * softplus(a + dt_bias), float32, softplus(x) = x above 20."""
    x = a if dt_bias is None else a + dt_bias.astype(mx.float32)
    softplus = mx.where(x > 20.0, x, mx.logaddexp(x, 0.0))
    return -mx.exp(A_log.astype(mx.float32)) * softplus


def _to_chunks(x, seqs, C, packed):
    """[B, T, HV, D] (or [B, T, HV] for g, beta -> D = 1) -> chunk-major [N * B, HV, C, D]: each
    sequence zero-padded to a multiple of C.

    Zero padding is inert: k = v = beta = 0 adds nothing to the state and g = 0 does not decay it.
    """
    if x.ndim == 3:
        x = x[..., None]
    B, T = x.shape[:2]
    if packed:
        index, valid = [], []
        for s, e in seqs:
            n = -(-(e - s) // C) * C
            index += list(range(s, e)) + [0] * (n - (e - s))
            valid += [1] * (e - s) + [0] * (n - (e - s))
        valid = mx.array(valid, dtype=x.dtype).reshape(1, -1, 1, 1)
        x = mx.take(x, mx.array(index), axis=1) * valid
    else:
        pad = -T % C
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
    N = x.shape[1] // C
    x = mx.transpose(x.reshape(B, N, C, x.shape[2], x.shape[3]), (1, 0, 3, 2, 4))
    return x.reshape(N * B, x.shape[2], C, x.shape[4])


def _from_chunks(o, seqs, T, B, packed):
    """Chunk-major [N * B, HV, C, V] -> [B, T, HV, V] without the padding."""
    NB, HV, C, V = o.shape
    o = mx.transpose(o.reshape(NB // B, B, HV, C, V), (1, 0, 3, 2, 4)).reshape(B, -1, HV, V)
    if not packed:
        return o[:, :T]
    index, start = [], 0
    for s, e in seqs:
        index += range(start, start + e - s)
        start += -(-(e - s) // C) * C
    return mx.take(o, mx.array(index), axis=1)


def _segments(seqs, C, packed):
    if not packed:
        return ((0, -(-seqs[0][1] // C)),)
    segments, n = [], 0
    for s, e in seqs:
        segments.append((n, n + -(-(e - s) // C)))
        n = segments[-1][1]
    return tuple(segments)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None,
                     dt_bias=None, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                     state_v_first=False, cu_seqlens=None, chunk_size=64, mode="auto",
                     keep_chunk_pieces=False):
    """The gated delta rule with fla's `chunk_gated_delta_rule` arguments.

    q, k: [B, T, H, K]; v: [B, T, HV, V] (HV a multiple of H; value head h reads q/k head
    h // (HV / H)); g (log-space decay, or the raw gate input `a` with use_gate_in_kernel), beta:
    [B, T, HV]. initial_state: [N, HV, K, V] ([N, HV, V, K] with state_v_first), N = B or the number
    of packed sequences in cu_seqlens. allow_neg_eigval doubles beta (after the in-kernel sigmoid).
    keep_chunk_pieces (chunked path, under mx.grad): keep the forward's per-chunk pieces (the C x C
    matrices K K^T, Q K^T and (I + A)^-1, and W, U) for the backward instead of computing them again:
    a faster backward for (3 C + K + V) more float32 values a token and value head (1.75 KB at
    C = 64, K = V = 128; about doubles what the op keeps).
    Returns (o [B, T, HV, V] in q's dtype, final float32 state or None).
    """
    seqs = _check_inputs(q, k, v, g, beta, initial_state, A_log, dt_bias, use_gate_in_kernel,
                         state_v_first, cu_seqlens, chunk_size, mode)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    options = _Options(K ** -0.5 if scale is None else scale, use_qk_l2norm_in_kernel,
                       use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                       A_log is not None, dt_bias is not None, bool(keep_chunk_pieces))
    if initial_state is None:
        h0 = kernels.zero_states(len(seqs), HV, K, V)
    else:
        h0 = initial_state.astype(mx.float32)
        if state_v_first:
            h0 = mx.swapaxes(h0, -1, -2)
    # absent gate parameters travel as zeros so every path takes the same arguments
    params = [kernels.zeros(HV) if x is None else x.astype(mx.float32) for x in (A_log, dt_bias)]

    packed = cu_seqlens is not None
    if mode == "auto":
        mode = "recurrent" if max(e - s for s, e in seqs) <= RECURRENT_MAX_TOKENS else "chunk"
    if mode == "recurrent":
        step = _recurrent_kernel if kernels.backend() != "ops" else _recurrent_ops
        if not packed:  # decode: no slices or concatenations around the step (it is host-bound)
            o, hT = step(options, q, k, v, g, beta, h0, *params)
        else:
            outs, finals = [], []
            for i, (s, e) in enumerate(seqs):
                o_i, hT_i = step(options, q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                 h0[i:i + 1], *params)
                outs.append(o_i)
                finals.append(hT_i)
            o, hT = mx.concatenate(outs, axis=1), mx.concatenate(finals, axis=0)
    elif packed:
        o, hT = _chunked(options, chunk_size, seqs, packed, h0, q, k, v, g, beta, *params)
    else:
        o, hT = _compiled_chunked(options, chunk_size)(h0, q, k, v, g, beta, *params)

    if not output_final_state:
        return o, None
    return o, mx.swapaxes(hT, -1, -2) if state_v_first else hT


class _Options:
    def __init__(self, scale, l2norm, gate, beta_sigmoid, neg_eigval, has_A_log, has_dt_bias, keep):
        self.scale, self.l2norm, self.gate = scale, l2norm, gate
        self.beta_sigmoid, self.neg_eigval, self.has_dt_bias = beta_sigmoid, neg_eigval, has_dt_bias
        self.keep_pieces = keep
        self.key = (scale, l2norm, gate, beta_sigmoid, neg_eigval, has_dt_bias, keep)


_chunked_fns = {}
_whole_op_fns = {}
kernels.forget_with_kernels.append(lambda: _whole_op_fns)


def _settings(module):
    """A module's upper-case settings of plain values (block sizes, kernel choices), hashable."""
    plain = (int, float, str, bool, type(None))
    frozen = lambda v: tuple(sorted(v.items())) if isinstance(v, dict) else v
    return tuple((k, frozen(v)) for k, v in sorted(vars(module).items()) if k.isupper() and (
        isinstance(v, plain) or isinstance(v, dict) and all(isinstance(x, plain) for x in v.values())))


def _compiled_chunked(opt, C):
    """_chunked for unpacked rows, under mx.compile on Metal/CUDA (on the CPU's MLX-ops path where
    the tests ask, chunk.COMPILE_ON_CPU): gdn-1.3b's prefill of 8192 tokens took 106-108 ms against
    110 on an H100 (alternating in one process; +1% in bench_model_gpu's best round). The settings
    read while tracing (the backend, chunk.py's and kernels.py's) are in the key: a change traces anew."""
    run = lambda h0, q, k, v, *rest: _chunked(opt, C, [(0, q.shape[1])] * q.shape[0], False, h0,
                                               q, k, v, *rest)
    which = kernels.backend()
    # not on the emulator: it runs each kernel at once, which tracing cannot do
    if not chunk.compiling() or which not in ("metal", "cuda", "ops"):
        return run
    key = (opt.key, C, which, _settings(kernels), _settings(chunk))
    if key not in _whole_op_fns:
        _whole_op_fns[key] = mx.compile(run)
    return _whole_op_fns[key]


def _chunked_inputs(opt, C, seqs, prepare):
    """prepare(opt, *xs) followed by the chunk-major layout of each array it returns: one function
    per (prepare, options, C) for unpacked rows, so that chunk.fused compiles it once (packed rows,
    whose gather indices depend on the sequences, are not compiled)."""
    chunked = lambda *xs: [_to_chunks(x, seqs, C, seqs is not None) for x in prepare(opt, *xs)]
    if seqs is not None:
        return chunked
    return fused(_chunked_fns.setdefault((prepare, opt.key, C), chunked))


def _layout_maps(seqs, T, C, packed):
    """int32 maps between token rows and padded positions (each sequence padded to a multiple of C):
    src[p], the token at padded position p (-1 for padding), and dst[t], the position of token t."""
    if not packed:
        p = mx.arange(-(-T // C) * C, dtype=mx.int32)
        return mx.where(p < T, p, -1), mx.arange(T, dtype=mx.int32)
    src, dst = [], []
    for s, e in seqs:
        dst += range(len(src), len(src) + e - s)
        src += list(range(s, e)) + [-1] * (-(e - s) % C)
    return mx.array(src, dtype=mx.int32), mx.array(dst, dtype=mx.int32)


def _chunked(opt, C, seqs, packed, h0, q, k, v, g, beta, A_log, dt_bias):
    """The chunked path from token rows to token rows as one custom function: q, k, v (and the
    gates) go to chunk.py's chunk-major layout (float32; with the kernels v, and k unless
    L2-normalised, keep their type), the output comes back to rows, and the
    backward takes the cotangents the same two ways. Only the raw inputs are kept for the backward,
    which lays them out again: not the chunk-major copies, nor the float32 output.
    On Metal/CUDA (q, k, v of one dtype) the layout of q, k, v and of the output is the layout
    kernels' (kernels.rows_to_chunks / chunks_to_rows, each the other's VJP, with the L2 norm's),
    but for the forward's v and output where it runs as one block: the chunk pieces read v from
    its rows, and the output kernel (where it runs) writes rows; otherwise, and for the gates
    (small), MLX ops and their autodiff.
    Returns (o [B, T, HV, V] in q's dtype, final state)."""
    B, T, H = q.shape[:3]
    HV = v.shape[2]
    segments = _segments(seqs, C, packed)
    seq_rows = seqs if packed else None
    gates = _chunked_inputs(opt, C, seq_rows, _prepare_gates)
    if kernels.backend() != "ops" and q.dtype == k.dtype == v.dtype:
        src, dst = _layout_maps(seqs, T, C, packed)

        # v, and k unless L2-normalised, stay in their input type: exact, and only the kernels read
        # them, for half the bytes with bf16. q (scaled) and a normalised k are float32 for the
        # backward (fla rounds a normalised k to bf16: 3e-3 relative in the gradients on the
        # emulator's test shapes); the forward may take them in bf16 (kernels.forward_qk_type).
        def layout(x, scale=1.0, l2norm=False, dtype=None):
            return kernels.rows_to_chunks(x, src, HV, C, scale=scale, l2norm=l2norm,
                                          dtype=dtype or x.dtype)

        def qk_in(q, k, dtype):
            return [layout(q, opt.scale, opt.l2norm, dtype),
                    layout(k, 1.0, opt.l2norm, dtype if opt.l2norm else k.dtype)]

        forward_qk = kernels.forward_qk_type(q.dtype == mx.bfloat16)
        qkv_in = lambda q, k, v: qk_in(q, k, mx.float32) + [layout(v)]
        # the forward's v stays in token rows: chunk_forward takes it so, given `rows`
        qkv_forward_in = lambda q, k, v: qk_in(q, k, forward_qk) + [v]

        def qkv_grads(q, k, v, dq, dk, dv):
            return (kernels.chunks_to_rows(dq, dst, B, H, q.dtype, scale=opt.scale,
                                           x=q if opt.l2norm else None),
                    kernels.chunks_to_rows(dk, dst, B, H, k.dtype, x=k if opt.l2norm else None),
                    kernels.chunks_to_rows(dv, dst, B, HV, v.dtype))

        rows = (src, dst, B, T)
        rows_out = lambda o: o  # chunk_forward gives the output in token rows, given `rows`
        chunks_in = lambda do: kernels.rows_to_chunks(do, src, HV, C)
    else:
        qkv_in = qkv_forward_in = _chunked_inputs(opt, C, seq_rows, _prepare_qkv)
        qkv_grads = lambda q, k, v, *cotangents: mx.vjp(qkv_in, [q, k, v], list(cotangents))[1]
        rows = None
        rows_out = lambda o: _from_chunks(o, seqs, T, B, packed).astype(q.dtype)
        chunks_in = lambda do: _to_chunks(do.astype(mx.float32), seqs, C, packed)  # rows_out's VJP

    @mx.custom_function
    def core(q, k, v, g, beta, A_log, dt_bias, h0):
        o, hT, states, u, kept = chunk_forward(*qkv_forward_in(q, k, v), *gates(g, beta, A_log, dt_bias),
                                               h0, segments, opt.keep_pieces, q.dtype, rows)
        return (rows_out(o), hT, states, u, *kept)

    @core.vjp
    def core_vjp(primals, cotangents, outputs):
        q, k, v, g, beta, A_log, dt_bias, h0 = primals
        _, _, states, u, *kept = outputs
        gate_inputs = [g, beta, A_log, dt_bias]
        dq, dk, dv, dg, dbeta, dh0 = chunk_backward(
            *qkv_in(q, k, v), *gates(*gate_inputs), segments, chunks_in(cotangents[0]),
            cotangents[1], states, u, tuple(kept))
        return (*qkv_grads(q, k, v, dq, dk, dv), *mx.vjp(gates, gate_inputs, [dg, dbeta])[1], dh0)

    o, hT = core(q, k, v, g, beta, A_log, dt_bias, h0)[:2]
    return o, hT


def _prepare(opt, q, k, v, g, beta, A_log, dt_bias):
    """The in-kernel options as MLX ops: float32, q/k L2 norm, gate, beta, scale, q/k to value heads."""
    return _prepare_qkv(opt, q, k, v) + _prepare_gates(opt, g, beta, A_log, dt_bias)


def _prepare_qkv(opt, q, k, v):
    """float32 q, k (L2-normalised with opt.l2norm; q scaled; repeated to the value heads) and v."""
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    if opt.l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * opt.scale
    group = v.shape[2] // q.shape[2]
    if group > 1:
        q, k = mx.repeat(q, group, axis=2), mx.repeat(k, group, axis=2)
    return q, k, v


def _prepare_gates(opt, g, beta, A_log, dt_bias):
    """float32 g (from the gate parameters with opt.gate) and beta (sigmoid, doubled, per opt)."""
    g, beta = g.astype(mx.float32), beta.astype(mx.float32)
    if opt.gate:
        g = gate_from_parameters(g, A_log, dt_bias if opt.has_dt_bias else None)
    if opt.beta_sigmoid:
        beta = mx.sigmoid(beta)
    if opt.neg_eigval:
        beta = beta * 2.0
    return g, beta


def _recurrent_ops(opt, q, k, v, g, beta, h0, A_log, dt_bias):
    o, hT = recurrent_gated_delta(*_prepare(opt, q, k, v, g, beta, A_log, dt_bias), h0)
    return o.astype(q.dtype), hT


_decode_steps = {}


def _recurrent_kernel(opt, q, k, v, g, beta, h0, A_log, dt_bias):
    """The fused decode kernel; its gradient is that of the ops recurrence (decode needs none, but a
    recurrent-mode call under mx.grad must still be right). One custom function per set of options,
    made once: a decode step is host-bound, and making it anew cost each call several µs."""
    if opt.key not in _decode_steps:
        @mx.custom_function
        def step(q, k, v, g, beta, h0, A_log, dt_bias):
            return kernels.decode_step(q, k, v, g, beta, h0, scale=opt.scale, A_log=A_log,
                                       dt_bias=dt_bias if opt.has_dt_bias else None,
                                       l2norm=opt.l2norm, gate=opt.gate,
                                       beta_sigmoid=opt.beta_sigmoid, neg_eigval=opt.neg_eigval)

        @step.vjp
        def step_vjp(primals, cotangents, outputs):
            _, grads = mx.vjp(lambda *xs: _recurrent_ops(opt, *xs), list(primals), list(cotangents))
            return tuple(grads)

        _decode_steps[opt.key] = step
    return _decode_steps[opt.key](q, k, v, g, beta, h0, A_log, dt_bias)
