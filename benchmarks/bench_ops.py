"""Gated delta rule: mlx_gdn (chunk, recurrent) vs mx.fast.gated_delta_update vs mlx-lm gated_delta_ops.

Same inputs for all (fp32 by default, k L2-normalised, q pre-scaled, g = log decay, state V-first for
the baselines); forward and forward+backward time (best of a few runs after a warm-up) and peak memory
(mx.get_peak_memory). Every measurement runs in its own process under a memory cap, so a baseline that
runs out of memory is reported as such instead of taking the machine down.

    python benchmarks/bench_ops.py                       # the table in benchmarks/RESULTS.md
    python benchmarks/bench_ops.py --seq-lens 512 --quick
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLS = ("mlx_gdn.chunk", "mlx_gdn.recurrent", "mx.fast.gated_delta_update", "mlx_lm.gated_delta_ops")
BASELINE = "mx.fast.gated_delta_update"


def make_inputs(B, T, H, D, dtype):
    import mlx.core as mx
    mx.random.seed(0)
    q = mx.random.normal((B, T, H, D)) * D ** -0.5
    k = mx.random.normal((B, T, H, D))
    k = k * mx.rsqrt(mx.sum(k * k, axis=-1, keepdims=True))
    v = mx.random.normal((B, T, H, D))
    g = mx.log(mx.random.uniform(0.9, 1.0, (B, T, H)))
    beta = mx.random.uniform(0, 1, (B, T, H))
    arrays = [x.astype(dtype) for x in (q, k, v)] + [g, beta.astype(dtype)]
    mx.eval(arrays)
    return arrays


def make_fn(impl):
    """(q, k, v, g, beta) -> o, every implementation computing the same thing."""
    import mlx.core as mx
    if impl.startswith("mlx_gdn."):
        from mlx_gdn.ops import gated_delta_rule
        mode = impl.split(".")[1]
        return lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, scale=1.0, mode=mode)[0]
    if impl == "mx.fast.gated_delta_update":
        return lambda q, k, v, g, beta: mx.fast.gated_delta_update(q, k, v, mx.exp(g), beta)[0]
    if impl == "mlx_lm.gated_delta_ops":
        from mlx_lm.models.gated_delta import gated_delta_ops
        return lambda q, k, v, g, beta: gated_delta_ops(q, k, v, mx.exp(g), beta)[0]
    raise ValueError(f"unknown implementation {impl!r}")


def measure(impl, B, T, H, D, dtype_name, backward, repeats):
    """Runs in a child process: prints one JSON line {seconds, peak_gb}."""
    import mlx.core as mx
    dtype = getattr(mx, dtype_name)
    inputs = make_inputs(B, T, H, D, dtype)
    fn = make_fn(impl)
    if backward:
        w = mx.random.normal((B, T, H, D)).astype(dtype)
        grad = mx.grad(lambda *xs: mx.sum(fn(*xs).astype(mx.float32) * w), argnums=list(range(5)))
        step = lambda: mx.eval(grad(*inputs))
    else:
        step = lambda: mx.eval(fn(*inputs))
    start = time.perf_counter()
    step()  # warm-up
    times = []
    n = 1 if time.perf_counter() - start > 5 else repeats
    mx.reset_peak_memory()
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": min(times), "peak_gb": mx.get_peak_memory() / 1e9}))


def run_child(args, impl, T, backward):
    cmd = [sys.executable, __file__, "--child", impl, str(T), str(int(backward)), "--batch",
           str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
           "--dtype", args.dtype, "--repeats", str(args.repeats)]
    cap = int(args.mem_cap_gb * 2 ** 30)
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit,
                          timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        oom = "memory" in proc.stderr.lower() or "bad_alloc" in proc.stderr or proc.returncode < 0
        return {"error": f"out of memory (> {args.mem_cap_gb:g} GB cap)" if oom else tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-cap-gb", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--max-baseline-bwd-len", type=int, default=2048,
                   help="skip forward+backward of the token-loop baselines above this length")
    p.add_argument("--max-baseline-fwd-len", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="one repeat")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_ops.json"))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        impl, T, backward = args.child
        measure(impl, args.batch, int(T), args.heads, args.head_dim, args.dtype, backward == "1",
                args.repeats)
        return
    if args.quick:
        args.repeats = 1

    import mlx.core as mx
    print(f"device {mx.default_device()}, mlx {mx.__version__}, (B, H, HV, D) = "
          f"({args.batch}, {args.heads}, {args.heads}, {args.head_dim}), {args.dtype}")
    rows = []
    for T in args.seq_lens:
        for backward in (False, True):
            for impl in IMPLS:
                own = impl.startswith("mlx_gdn.")
                limit = args.max_baseline_bwd_len if backward else args.max_baseline_fwd_len
                if (not own or impl == "mlx_gdn.recurrent") and T > limit:
                    continue
                res = run_child(args, impl, T, backward)
                row = {"impl": impl, "T": T, "pass": "fwd+bwd" if backward else "fwd", **res}
                rows.append(row)
                print(json.dumps(row), flush=True)

    print()
    print("| T | pass | implementation | time (s) | peak memory (GB) | speed-up vs "
          f"{BASELINE} | memory vs it |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next((r for r in rows if r["impl"] == BASELINE and r["T"] == row["T"]
                     and r["pass"] == row["pass"] and "seconds" in r), None)
        if "error" in row:
            print(f"| {row['T']} | {row['pass']} | {row['impl']} | {row['error']} | | | |")
            continue
        speed = f"{base['seconds'] / row['seconds']:.1f}x" if base else "-"
        mem = f"{base['peak_gb'] / row['peak_gb']:.1f}x less" if base else "-"
        print(f"| {row['T']} | {row['pass']} | {row['impl']} | {row['seconds']:.3f} | "
              f"{row['peak_gb']:.3f} | {speed} | {mem} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": str(mx.default_device()), "mlx": mx.__version__, "args": vars(args),
                   "rows": rows, "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
