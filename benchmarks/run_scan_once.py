"""Runs the chunk-scan kernels alone a few times at one shape, for a profiler (run on the device):

    ncu --kernel-name regex:scan --launch-skip 2 --launch-count 1 --set full \\
        python3 benchmarks/run_scan_once.py [B T H D [KERNEL THREADS]]

KERNEL: mma (chunk_scan_mma.metal) or simt (chunk_scan.metal).
"""

import sys

import mlx.core as mx

from mlx_gdn.ops import kernels


def main():
    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (1, 8192, 16, 128)
    if len(sys.argv) > 6:
        kernels.SCAN_KERNEL = sys.argv[5]
        kernels.SCAN_THREADS = kernels.MMA_SCAN_THREADS = int(sys.argv[6])
    C, N = 64, T // 64
    mx.random.seed(0)
    W = mx.random.normal((N * B, H, C, D)) * 0.05
    U = mx.random.normal((N * B, H, C, D))
    Kt = mx.random.normal((N * B, H, C, D)) * 0.05
    decay = mx.full((N * B, H, 1, 1), 0.9)
    h0 = mx.zeros((B, H, D, D))
    QdO = mx.zeros((N * B, H, D, D))  # the reverse scan's per-chunk [K, V] term
    for _ in range(4):
        mx.eval(kernels.scan_forward(W, U, Kt, decay, h0, ((0, N),)))
        mx.eval(kernels.scan_backward(U, QdO, Kt, W, decay, h0, ((0, N),)))
    print("done", kernels.backend())


if __name__ == "__main__":
    main()
