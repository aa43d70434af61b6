"""A/B of kernel texts on the device: the shipped body of one chunk kernel against variant bodies
(files) and variant CUDA preludes, timed in turn in one process, each variant's outputs compared with
the shipped ones. Every text compiles under its own name (kernels.text_named: MLX caches compiled
kernels by name, so swapping texts under one name would time the first one twice).

    python benchmarks/ab_kernels.py chunk_scan --body v1.metal v2.metal --shapes 1,8192,16,128x128
    python benchmarks/ab_kernels.py chunk_scan_mma --prelude prelude_tf32.h --threads 256
    python benchmarks/ab_kernels.py chunk_grads --body old_grads.metal

Shapes are B,T,H,KxV (C = 64). --emulate runs the kernels through the CPU emulator of tests/ (tiny
shapes only: a check that the script and the variants run, not a timing).
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

import metal_kernels
from mlx_gdn.ops import kernels

ROOT = Path(__file__).resolve().parents[1]


def inputs(kernel, B, T, H, K, V, C=64):
    """Random inputs of the kernel's workload at (B, T, H, K, V), chunk-major float32."""
    mx.random.seed(0)
    M = T // C * B
    r = lambda *s, scale=1.0: mx.random.normal(s) * scale
    if kernel.startswith("chunk_scan"):
        xs = (r(M, H, C, K, scale=0.05), r(M, H, C, V), r(M, H, C, K, scale=0.05),
              -mx.cumsum(mx.full((M, H, C, 1), 0.002), axis=-2), r(B, H, K, V),
              r(M, H, K, V, scale=0.01))
    elif kernel == "chunk_pieces":
        xs = (r(M, H, C, K, scale=0.1), r(M, H, C, K, scale=0.1), r(M, H, C, V),
              -mx.cumsum(mx.random.uniform(shape=(M, H, C, 1)) * 0.1, axis=-2),
              mx.random.uniform(shape=(M, H, C, 1)))
    elif kernel == "chunk_grads":
        ck, cv, cc = (M, H, C, K), (M, H, C, V), (M, H, C, C)
        xs = (r(*ck), r(*ck), r(*cv), r(*cv), r(*cv), r(*cv), r(*ck), r(*ck), r(*ck),
              mx.tril(r(*cc)), r(*ck), r(*cv), mx.tril(r(*cc)), mx.tril(r(*cc)),
              -mx.abs(r(M, H, C, 1)), mx.abs(r(M, H, C, 1)), r(M, H, 1, 1))
    else:
        raise SystemExit(f"ab_kernels: no workload for {kernel}")
    mx.eval(xs)
    return xs


def workload(kernel, xs, T, C=64):
    """The kernel's calls on xs: a function returning every output."""
    if kernel.startswith("chunk_scan"):
        W, U, k, gamma, h0, QdO = xs
        segments = ((0, T // C),)
        return lambda: (*kernels.scan_forward(W, U, k, gamma, h0, segments),
                        *kernels.scan_backward(U, QdO, k, W, gamma, h0, segments))
    if kernel == "chunk_pieces":
        return lambda: kernels.chunk_pieces(*xs)
    return lambda: kernels.chunk_grads(*xs)


def timed(fn, runs):
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(runs):
        mx.eval(fn())
    return (time.perf_counter() - start) / runs * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kernel", choices=["chunk_scan", "chunk_scan_mma", "chunk_scan_resident", "chunk_pieces",
                                      "chunk_grads"])
    p.add_argument("--body", nargs="*", default=[], help="variant kernel bodies (.metal files)")
    p.add_argument("--prelude", nargs="*", default=[], help="variant CUDA preludes (.h files)")
    p.add_argument("--shapes", nargs="*", default=["1,8192,16,128x128", "4,4096,16,128x128",
                                                    "1,8192,9,200x400"])
    p.add_argument("--threads", type=int, help="the scan's threads (default: kernels.py's)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=10, help="timed calls a round")
    p.add_argument("--emulate", action="store_true", help="the CPU emulator (tests/emulator)")
    p.add_argument("--out")
    args = p.parse_args()

    source, prelude = metal_kernels.source, metal_kernels.prelude
    variants = {"shipped": (None, None)}
    variants |= {f"body:{Path(f).name}": (Path(f).read_text(), None) for f in args.body}
    variants |= {f"prelude:{Path(f).name}": (None, Path(f).read_text()) for f in args.prelude}
    if args.kernel.startswith("chunk_scan"):
        kernels.SCAN_KERNEL = {"chunk_scan_mma": "mma", "chunk_scan_resident": "resident"}.get(args.kernel, "simt")
        if args.threads:
            kernels.SCAN_THREADS = kernels.MMA_SCAN_THREADS = args.threads
    if args.emulate:
        sys.path.insert(0, str(ROOT / "tests"))
        from emulator import EmulatedKernel
        context = kernels.use_factory("emulated", EmulatedKernel)
    else:
        context = contextlib.nullcontext()
    rows = []
    with context:
        for shape in args.shapes:
            B, T, H, D = shape.split(",")
            B, T, H = int(B), int(T), int(H)
            K, V = (int(x) for x in D.split("x"))
            xs = inputs(args.kernel, B, T, H, K, V)
            times, outs = {}, {}
            for _ in range(args.rounds):
                for name, (body, head) in variants.items():
                    metal_kernels.source = lambda n, b=body: b if b and n == args.kernel else source(n)
                    metal_kernels.prelude = lambda w, h=head: h if h and w == "cuda" else prelude(w)
                    kernels.forget_kernels()
                    fn = workload(args.kernel, xs, T)
                    try:
                        outs[name] = fn()
                        mx.eval(outs[name])
                        times.setdefault(name, []).append(timed(fn, args.runs))
                    except Exception as e:  # e.g. more registers than the threads allow
                        times.setdefault(name, []).append(f"failed: {str(e)[:120]}")
            metal_kernels.source, metal_kernels.prelude = source, prelude
            for name in variants:
                diff = None
                if name in outs and "shipped" in outs:
                    diff = max(float(mx.max(mx.abs(a - b))) for a, b in zip(outs[name], outs["shipped"]))
                row = {"kernel": args.kernel, "shape": [B, T, H, K, V], "variant": name,
                       "ms": times[name], "max_abs_diff_vs_shipped": diff}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(mx.default_device()), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
