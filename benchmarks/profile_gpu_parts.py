"""Where the GPU time goes: the chunked op's parts timed one by one (run on the device machine).

    PYTHONPATH=. python benchmarks/profile_gpu_parts.py [B T H K [V]]

Prints, for one bf16 shape: the whole forward and forward+backward at several block sizes, then the
per-chunk pieces (C x C matrices, WY), each scan kernel alone and the output product, each timed
on its own.
"""

import functools
import json
import sys

import mlx.core as mx

from bench_gpu import bench_ours, guarded, inputs
from bench_gpu import time_mlx as time_each

# the parts pipelined (queued back to back, one synchronisation): their GPU time, not MLX's per-call
# host work and wait (0.1 ms or more each; sessions 1-12 timed the parts that way)
time_mlx = functools.partial(time_each, pipelined=True)
from mlx_gdn.ops import chunk, gated_delta, kernels


# (kernel, value columns, threads); the resident scan's are its own (kernels.RESIDENT_SCAN_GROUPS,
# by direction: named "resident_own")
SCAN_CONFIGS = [("mma", 16, 512), ("mma", 16, 256), ("simt", 16, 512), ("simt", 16, 256),
                ("resident", None, None)]
BF16 = True  # the inputs are bfloat16, so the op passes the scans bf16_products


def shaped_inputs(B, T, H, K, V):
    q, k, _, g, beta = inputs(B, T, H, K)
    v = inputs(B, T, H, V, seed=1)[2]
    return q, k, v, g, beta


def parts(B, T, H, K, V, C=64):
    q, k, v, g, beta = (mx.array(x) for x in shaped_inputs(B, T, H, K, V))
    q, k, v, beta = (x.astype(mx.bfloat16) for x in (q, k, v, beta))  # as bench_gpu passes them
    opt = gated_delta._Options(K ** -0.5, True, False, False, False, False, False, False)
    params = (mx.zeros((H,)), mx.zeros((H,)))
    prep = lambda: gated_delta._chunked_inputs(opt, C, None, gated_delta._prepare)(q, k, v, g, beta, *params)  # compiled
    out = {"prepare_ms": time_mlx(lambda: prep())}
    cots = [mx.ones_like(x) for x in prep()]
    out["prepare_vjp_ms"] = time_mlx(lambda: mx.vjp(
        lambda *xs: gated_delta._chunked_inputs(opt, C, None, gated_delta._prepare)(*xs, *params), [q, k, v, g, beta], cots)[1])
    chunk.COMPILE = False
    out["prepare_uncompiled_ms"] = time_mlx(lambda: prep())
    chunk.COMPILE = True
    # the same through the layout kernels (q, k, v) and compiled ops (g, beta), and its VJP
    src, dst = gated_delta._layout_maps([(0, T)] * B, T, C, False)
    gates = gated_delta._chunked_inputs(opt, C, None, gated_delta._prepare_gates)
    layout = lambda q, k, v, g, beta: [kernels.rows_to_chunks(x, src, H, C, scale=s, l2norm=n, dtype=d) for x, s, n, d in
                                       ((q, opt.scale, True, mx.float32), (k, 1.0, True, mx.float32),
                                        (v, 1.0, False, v.dtype))] + gates(g, beta, *params)
    out["prepare_layout_kernels_ms"] = time_mlx(lambda: layout(q, k, v, g, beta))
    out["prepare_layout_kernels_vjp_ms"] = time_mlx(lambda: [  # as the op's backward does it
        kernels.chunks_to_rows(cots[0], dst, B, H, q.dtype, scale=opt.scale, x=q),
        kernels.chunks_to_rows(cots[1], dst, B, H, k.dtype, x=k), kernels.chunks_to_rows(cots[2], dst, B, H, v.dtype),
        *mx.vjp(gates, [g, beta, *params], cots[3:])[1]])
    cq, ck, cv, cg, cb = prep()
    cv = cv.astype(v.dtype)  # as the op's layout leaves v
    mx.eval(cq, ck, cv, cg, cb)
    pieces = lambda: chunk._ChunkPieces(cq, ck, cv, cg, cb)
    fields = lambda pc: [pc.W, pc.U, pc.P, pc.decay, pc.eg, getattr(pc, "Kt", pc.gamma)]
    out["pieces_ms"] = time_mlx(lambda: fields(pieces()))  # element-wise chains compiled (chunk.fused)
    with kernels.use_factory("ops", None):  # MLX ops only (the inverse too), not compiled
        out["pieces_ops_ms"] = time_mlx(lambda: fields(pieces()))
    pc = pieces()
    mx.eval(fields(pc))
    h0 = mx.zeros((B, H, K, V))
    QdO = mx.zeros((pc.W.shape[0], H, K, V))
    seg = ((0, T // C),)
    default = kernels.SCAN_KERNEL, kernels.SCAN_TILE, kernels.SCAN_THREADS, kernels.MMA_SCAN_THREADS
    resident, kernels.SCAN_RESIDENT = kernels.SCAN_RESIDENT, {}  # each config's tile as named
    both = {}
    for kernel, tile, threads in SCAN_CONFIGS:
        kernels.SCAN_KERNEL, kernels.SCAN_TILE = kernel, tile
        kernels.SCAN_THREADS = kernels.MMA_SCAN_THREADS = threads
        name = f"{kernel}_{tile}x{threads}" if tile else f"{kernel}_own"
        out[f"scan_fwd_{name}_ms"] = guarded(lambda: time_mlx(
            lambda: kernels.scan_forward(pc.W, pc.U, ck, pc.gamma, h0, seg, BF16)))
        out[f"scan_bwd_{name}_ms"] = guarded(lambda: time_mlx(lambda: kernels.scan_backward(
            pc.U, QdO, ck, pc.W, pc.gamma, h0, seg, BF16)))
        if isinstance(out[f"scan_fwd_{name}_ms"], float) and isinstance(out[f"scan_bwd_{name}_ms"], float):
            both[name] = out[f"scan_fwd_{name}_ms"] + out[f"scan_bwd_{name}_ms"]
    out["best_scan"] = min(both, key=both.get) if both else None
    kernels.SCAN_KERNEL, kernels.SCAN_TILE, kernels.SCAN_THREADS, kernels.MMA_SCAN_THREADS = default
    kernels.SCAN_RESIDENT = resident
    states, u, _ = kernels.scan_forward(pc.W, pc.U, ck, pc.gamma, h0, seg, BF16)
    mx.eval(states, u)
    out["output_ms"] = time_mlx(lambda: chunk.fused(chunk._output)(cq, pc.eg, states, pc.P, u))
    addmm = lambda q, eg, states, P, u: mx.addmm(P @ u, q * eg, states)  # the sum in the GEMM
    out["output_addmm_ms"] = time_mlx(lambda: chunk.fused(addmm)(cq, pc.eg, states, pc.P, u))
    seqs = [(0, T)] * B
    out["output_layout_ops_ms"] = time_mlx(lambda: gated_delta._from_chunks(u, seqs, T, B, False).astype(q.dtype))
    out["output_layout_kernel_ms"] = time_mlx(lambda: kernels.chunks_to_rows(u, dst, B, H, q.dtype))
    out["pieces_kernel_ms"] = time_mlx(lambda: kernels.chunk_pieces(cq, ck, cv, pc.gamma, cb))
    out["pieces_kernel_forward_ms"] = time_mlx(lambda: kernels.chunk_pieces(cq, ck, cv, pc.gamma, cb, False))
    # the backward's parts (pieces recomputed as above, then these)
    do = mx.random.normal(u.shape)
    Qg, PdO, QdO = chunk.fused(chunk._scan_backward_inputs)(cq, pc.eg, pc.P, do)
    out["bwd_scan_inputs_ms"] = time_mlx(lambda: chunk.fused(chunk._scan_backward_inputs)(cq, pc.eg, pc.P, do))
    out["bwd_scan_ms"] = time_mlx(lambda: kernels.scan_backward(PdO, QdO, ck, pc.W, pc.gamma, h0, seg, BF16))
    du, dh_next, _ = kernels.scan_backward(PdO, QdO, ck, pc.W, pc.gamma, h0, seg, BF16)
    args = (cq, ck, cv, cb, do, states, u, du, dh_next, Qg, pc.incl, pc.strict, pc.Gam, pc.eg, pc.tail,
            pc.decay, pc.KKG, pc.A, pc.P, pc.Tinv, pc.W, pc.U, ck * pc.tail)
    mx.eval(args)
    out["bwd_after_scan_ms"] = time_mlx(lambda: chunk.fused(chunk._backward_after_scan)(*args))
    out["bwd_after_scan_uncompiled_ms"] = time_mlx(lambda: chunk._backward_after_scan(*args))
    out["bwd_after_scan_kernel_ms"] = time_mlx(lambda: chunk._backward_after_scan_kernel(
        cq, ck, cv, cb, do, states, u, du, dh_next, pc))
    out["bwd_block_ms"] = time_mlx(lambda: chunk._backward_block(cq, ck, cv, cg, cb, do, h0, states, u, seg))
    # single products of the after-scan part, to see what one such launch costs at this shape
    t = chunk._t
    out["bwd_one_product_CxV_VxK_ms"] = time_mlx(lambda: du @ t(states))
    out["bwd_one_product_CxC_CxK_ms"] = time_mlx(lambda: t(pc.Tinv) @ pc.W)
    out["bwd_one_product_CxK_KxC_ms"] = time_mlx(lambda: pc.W @ t(pc.W))
    out["bwd_one_elementwise_CxK_ms"] = time_mlx(lambda: pc.W * pc.eg + cq)
    return out


def main():
    B, T, H, K = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (1, 8192, 16, 128)
    V = int(sys.argv[5]) if len(sys.argv) > 5 else K
    print(f"mlx {mx.__version__} {mx.default_device()} backend {kernels.backend()} shape {(B, T, H, K, V)}")
    data = shaped_inputs(B, T, H, K, V)
    for scale in (1, 8):
        chunk.KERNEL_BLOCK_SCALE = scale
        print(json.dumps({"block_scale": scale, **bench_ours(*data)}), flush=True)
    print(json.dumps(parts(B, T, H, K, V)), flush=True)
    # the whole op under mx.compile (element-wise chains fused)
    qm, km, vm, bm = (mx.array(x).astype(mx.bfloat16) for x in (data[0], data[1], data[2], data[4]))
    gm = mx.array(data[3])
    fwd = mx.compile(lambda *xs: gated_delta.gated_delta_rule(*xs, use_qk_l2norm_in_kernel=True,
                                                             mode="chunk")[0])
    print(json.dumps({"fwd_compiled_ms": guarded(lambda: time_mlx(lambda: fwd(qm, km, vm, gm, bm)))}))


if __name__ == "__main__":
    main()
