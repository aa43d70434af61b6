"""Runs the chunk kernels (pieces, forward and reverse scan) alone a few times at one shape, for a
profiler, and prints each one's time (run on the device):

    ncu --kernel-name regex:pieces --launch-skip 2 --launch-count 1 --set full \\
        python3 benchmarks/run_kernels_once.py [B T H D [KERNEL THREADS [TILE]]]

D: the head size, or KxV (e.g. 200x400). KERNEL: the scan kernel, simt (chunk_scan.metal) or mma
(chunk_scan_mma.metal); THREADS: its threads per threadgroup; TILE: its value columns.
"""

import sys
import time

import mlx.core as mx

from ab_kernels import inputs
from mlx_gdn.ops import kernels


def timed(name, fn, runs=4):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    print(f"{name}: {min(times[1:]) * 1e3:.3f} ms (best of {runs - 1} after one warm-up)")


def main():
    B, T, H, D = sys.argv[1:5] if len(sys.argv) > 4 else (1, 8192, 16, "128")
    B, T, H = int(B), int(T), int(H)
    K, V = (int(x) for x in D.split("x")) if "x" in D else (int(D), int(D))
    if len(sys.argv) > 6:
        kernels.SCAN_KERNEL = sys.argv[5]
        kernels.SCAN_THREADS = kernels.MMA_SCAN_THREADS = int(sys.argv[6])
    if len(sys.argv) > 7:
        kernels.SCAN_TILE = int(sys.argv[7])
        kernels.SCAN_RESIDENT = {}  # this tile whatever the grid
    N = T // 64
    W, U, k, gamma, h0, QdO = inputs("chunk_scan", B, T, H, K, V)
    q, k_, v, gamma_, beta = inputs("chunk_pieces", B, T, H, K, V)
    timed("chunk_pieces", lambda: kernels.chunk_pieces(q, k_, v, gamma_, beta))
    timed("scan_forward", lambda: kernels.scan_forward(W, U, k, gamma, h0, ((0, N),)))
    timed("scan_backward", lambda: kernels.scan_backward(U, QdO, k, W, gamma, h0, ((0, N),)))
    print("backend", kernels.backend(), "scan", kernels.SCAN_KERNEL)


if __name__ == "__main__":
    main()
