"""GPU benchmark (run on the device machine: MLX's CUDA build + fla 0.6.0 / Triton, one process).

bf16, q/k L2-normalised in kernel, g log decay, beta in (0, 1): forward and forward+backward time of
mlx_gdn.ops.gated_delta_rule vs fla chunk_gated_delta_rule vs mx.fast.gated_delta_update, and one
decode step (B in {1, 16}, H = 16, D = 128) vs fla fused_recurrent_gated_delta_rule. Ours'
forward+backward is timed op by op (mx.grad) and compiled whole (mx.compile(mx.grad), as train.py's
step runs it).

MLX and PyTorch are timed the same way: calls queued back to back, one synchronisation at the end
(CUDA launches are asynchronous; `mx.async_eval` lets MLX build call i + 1 while the GPU runs call
i). Ours is also timed with a wait after every call (`*_sync_ms`, the timing of sessions 1-12),
which adds MLX's per-call host work and synchronisation (0.7-1 ms at these shapes on the H100).

    PYTHONPATH=. python benchmarks/bench_gpu.py [--out results.json] [--skip-builtin-bwd]
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from mlx_gdn.models import Model, ModelArgs, PRESETS
from mlx_gdn.ops import gated_delta_rule, kernels

SHAPES = [(1, 8192, 16, 128), (4, 4096, 16, 128), (8, 2048, 32, 128)]


def random_model(preset, dtype=mx.bfloat16):
    """A preset with random weights (seed 0) in `dtype`, evaluated."""
    mx.random.seed(0)
    model = Model(ModelArgs(**PRESETS[preset]))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def time_mlx(fn, repeats=10, warmup=3, pipelined=False):
    """ms per call of fn (its outputs evaluated): each call waited for, or pipelined (queued with
    mx.async_eval, one synchronisation at the end, as time_torch times PyTorch)."""
    for _ in range(warmup):
        mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        if pipelined:
            mx.async_eval(fn())
        else:
            mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def time_torch(torch, fn, repeats=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def inputs(B, T, H, D, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, H, D)).astype(np.float32)
    v = rng.standard_normal((B, T, H, D)).astype(np.float32)
    g = np.log(rng.uniform(0.9, 1.0, (B, T, H))).astype(np.float32)
    beta = rng.uniform(0, 1, (B, T, H)).astype(np.float32)
    return q, k, v, g, beta


def ours(q, k, v, g, beta, weighted=True, **opts):
    """Our op on bf16 inputs (opts go to it): (its arguments, forward, forward+backward op by op,
    forward+backward compiled whole). The loss weights the output by random numbers, or sums it."""
    qm, km, vm, bm = (mx.array(x).astype(mx.bfloat16) for x in (q, k, v, beta))
    args = (qm, km, vm, mx.array(g), bm)
    op = lambda *xs: gated_delta_rule(*xs, use_qk_l2norm_in_kernel=True, mode="chunk", **opts)[0]
    w = mx.random.normal(vm.shape).astype(mx.bfloat16) if weighted else 1.0
    loss = lambda *xs: (op(*xs) * w).astype(mx.float32).sum()
    grad = mx.grad(loss, argnums=[0, 1, 2, 3, 4])
    # compiled whole, as train.py's step runs the op (MLX compiles nothing inside mx.grad: op by
    # op, the op's element-wise chains do not fuse)
    return args, op, grad, mx.compile(grad)


def bench_ours(q, k, v, g, beta, **opts):
    """ms of the forward, forward+backward op by op and compiled ({fwd, fwdbwd, fwdbwd_compiled}_ms,
    pipelined as fla is timed, and the same with a wait after every call, _sync_ms); opts go to the op."""
    args, *fns = ours(q, k, v, g, beta, **opts)
    out = {}
    for name, fn in zip(("fwd", "fwdbwd", "fwdbwd_compiled"), fns):
        out[f"{name}_ms"] = time_mlx(lambda: fn(*args), pipelined=True)
        out[f"{name}_sync_ms"] = time_mlx(lambda: fn(*args))
    return out


def prefixed(prefix, timings):
    return {f"{prefix}_{key}": value for key, value in timings.items()}


def peak_gb(fn):
    """Peak memory (GB) of one evaluation of fn, caches freed first."""
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() / 1e9


def kept_pieces_memory(q, k, v, g, beta):
    """Peak GB of the compiled forward+backward without and with keep_chunk_pieces."""
    peaks = {}
    for keep in (False, True):
        args, _, _, compiled = ours(q, k, v, g, beta, weighted=False, keep_chunk_pieces=keep)
        peaks[f"ours{'_kept' if keep else ''}_fwdbwd_peak_gb"] = peak_gb(lambda: compiled(*args))
    return peaks


def bench_builtin(q, k, v, g, beta, backward):
    D = q.shape[-1]
    qm = mx.array(q / np.linalg.norm(q, axis=-1, keepdims=True) * D ** -0.5).astype(mx.bfloat16)
    km = mx.array(k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(mx.bfloat16)
    vm, bm = mx.array(v).astype(mx.bfloat16), mx.array(beta).astype(mx.bfloat16)
    gamma = mx.exp(mx.array(g)).astype(mx.bfloat16)
    fwd = lambda: mx.fast.gated_delta_update(qm, km, vm, gamma, bm)[0]
    out = {"fwd_ms": guarded(lambda: time_mlx(fwd, repeats=2, warmup=1, pipelined=True))}
    if backward:
        loss = lambda *xs: mx.fast.gated_delta_update(*xs)[0].astype(mx.float32).sum()
        grad = mx.grad(loss, argnums=[0, 1, 2, 3, 4])
        # its autodiff keeps a K x V state per token: may run out of memory
        out["fwdbwd_ms"] = guarded(lambda: time_mlx(lambda: grad(qm, km, vm, gamma, bm), repeats=1,
                                                    warmup=1, pipelined=True))
    return out


def best(values):
    """The least of the timings (noise only adds time), or the first error if none succeeded."""
    times = [v for v in values if isinstance(v, float)]
    return min(times) if times else values[0]


def guarded(measure):
    """A measurement, or the error that stopped it (out of memory, fla refusing); caches freed."""
    try:
        return measure()
    except Exception as err:
        return f"error: {type(err).__name__}: {str(err)[:200]}"
    finally:
        mx.clear_cache()
        try:
            import torch
            torch.cuda.empty_cache()
        except Exception:
            pass


def bench_fla(torch, fla_ops, q, k, v, g, beta, backward=True):
    t = lambda x, dt=torch.bfloat16: torch.tensor(x, device="cuda").to(dt)
    qt, kt, vt, bt = (t(x).requires_grad_() for x in (q, k, v, beta))
    gt = t(g, torch.float32).requires_grad_()
    run = lambda: fla_ops.chunk_gated_delta_rule(qt, kt, vt, gt, bt, use_qk_l2norm_in_kernel=True)[0]
    with torch.no_grad():
        fwd = guarded(lambda: time_torch(torch, run))
    if not backward:
        return fwd, None
    w = torch.randn_like(vt)

    def fwdbwd():
        (run() * w).float().sum().backward()

    return fwd, guarded(lambda: time_torch(torch, fwdbwd))


def bench_decode(torch, fla_ops, B, H=16, D=128, rounds=3):
    """µs per decode step, the three in turn `rounds` times (a step is host-bound: one timing moves
    up to 4x between processes on the lent machine); each key the best round, `<key>_rounds` all."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((B, 1, H, D)).astype(np.float32) for _ in range(3))
    g = np.log(rng.uniform(0.9, 1.0, (B, 1, H))).astype(np.float32)
    beta = rng.uniform(0, 1, (B, 1, H)).astype(np.float32)
    state = rng.standard_normal((B, H, D, D)).astype(np.float32) * 0.1
    qm, km, vm, bm = (mx.array(x).astype(mx.bfloat16) for x in (q, k, v, beta))
    gm, sm = mx.array(g), mx.array(state)
    step = lambda: gated_delta_rule(qm, km, vm, gm, bm, initial_state=sm, output_final_state=True,
                                    use_qk_l2norm_in_kernel=True, mode="recurrent")
    sv = mx.swapaxes(sm, -1, -2)
    qn = qm * (D ** -0.5)
    builtin = lambda: mx.fast.gated_delta_update(qn, km, vm, mx.exp(gm).astype(mx.bfloat16), bm, sv)
    timers = {"ours_us": lambda: time_mlx(step, repeats=100, pipelined=True),
              "ours_sync_us": lambda: time_mlx(step, repeats=100),
              "builtin_us": lambda: time_mlx(builtin, repeats=100, pipelined=True)}
    if fla_ops is not None:
        t = lambda x, dt=torch.bfloat16: torch.tensor(x, device="cuda").to(dt)
        args = (t(q), t(k), t(v), t(g, torch.float32), t(beta))
        st = t(state, torch.float32)
        timers["fla_us"] = lambda: time_torch(torch, lambda: fla_ops.fused_recurrent_gated_delta_rule(
            *args[:3], g=args[3], beta=args[4], initial_state=st, output_final_state=True,
            use_qk_l2norm_in_kernel=True), repeats=100)
    row = {"B": B}
    for _ in range(rounds):
        for key, timer in timers.items():
            row.setdefault(f"{key}_rounds", []).append(timer() * 1e3)
    row.update({key: best(row[f"{key}_rounds"]) for key in timers})
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_gpu.json")
    p.add_argument("--skip-builtin-bwd", action="store_true")
    p.add_argument("--skip-builtin", action="store_true", help="do not time mx.fast.gated_delta_update")
    p.add_argument("--shapes", default="all", help="'all', 'none' or indices into SHAPES, e.g. 0,1")
    p.add_argument("--scan-config", type=int, nargs=2, metavar=("TILE", "THREADS"),
                   help="SIMT chunk-scan value tile and threads per threadgroup (default: kernels.py's)")
    p.add_argument("--rounds", type=int, default=3,
                   help="times ours and fla are timed in turn at each shape (the best round is kept: "
                        "fla's times move up to 3x between calls)")
    p.add_argument("--compare-mma", action="store_true",
                   help="also time ours with the 8x8-matrix scan (chunk_scan_mma.metal) in the same run")
    p.add_argument("--compare-kept", action="store_true",
                   help="also time ours with keep_chunk_pieces=True (and both variants' peak memory)")
    args = p.parse_args()
    if args.scan_config:
        kernels.SCAN_TILE, kernels.SCAN_THREADS = args.scan_config
        kernels.SCAN_RESIDENT = {}  # this tile at every shape
    try:
        import torch
        import fla.ops.common.chunk_o as chunk_o
        import fla.ops.gated_delta_rule as fla_ops
        chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: fla's gated backward is unreliable there
    except Exception as err:
        print(f"fla unavailable ({err}); timing MLX only")
        torch = fla_ops = None
    print(f"mlx {mx.__version__}, device {mx.default_device()}, mlx_gdn backend {kernels.backend()}")
    rows = []
    named = {"all": SHAPES, "none": []}
    shapes = named[args.shapes] if args.shapes in named else [SHAPES[int(i)] for i in args.shapes.split(",")]
    for B, T, H, D in shapes:
        data = inputs(B, T, H, D)
        row = {"shape": [B, T, H, D]}
        # ours and fla take turns, --rounds times; each key gets the best round, "<key>_rounds" all
        for _ in range(args.rounds):
            timed = prefixed("ours", bench_ours(*data))
            if args.compare_mma:
                kernel, kernels.SCAN_KERNEL = kernels.SCAN_KERNEL, "mma"
                timed.update(prefixed("ours_mma", bench_ours(*data)))
                kernels.SCAN_KERNEL = kernel
            if args.compare_kept:
                timed.update(prefixed("ours_kept", bench_ours(*data, keep_chunk_pieces=True)))
            if fla_ops is not None:
                timed.update(zip(("fla_fwd_ms", "fla_fwdbwd_ms"), bench_fla(torch, fla_ops, *data)))
            for key, value in timed.items():
                row.setdefault(f"{key}_rounds", []).append(value)
            print(json.dumps(timed), flush=True)
        row.update({key[:-len("_rounds")]: best(values) for key, values in list(row.items())
                    if key.endswith("_rounds")})
        if args.compare_kept:
            row.update(kept_pieces_memory(*data))
        if not args.skip_builtin:
            builtin = bench_builtin(*data, backward=not args.skip_builtin_bwd)
            row.update({f"builtin_{k}": val for k, val in builtin.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the built-in's forward+backward where it fits in memory, against ours on the same inputs
    if args.shapes != "none" and not args.skip_builtin:
        data = inputs(1, 2048, 16, 128)
        small = {"shape": [1, 2048, 16, 128]}
        small.update(prefixed("ours", bench_ours(*data)))
        small.update({f"builtin_{k}": val for k, val in
                      bench_builtin(*data, backward=not args.skip_builtin_bwd).items()})
        rows.append(small)
        print(json.dumps(small), flush=True)
    decode = [guarded(lambda: bench_decode(torch, fla_ops, B, rounds=args.rounds)) for B in (1, 16)]
    for row in decode:
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": str(mx.default_device()), "scan_kernel": kernels.SCAN_KERNEL,
                   "rows": rows, "decode": decode}, f, indent=1)


if __name__ == "__main__":
    main()
