"""One bf16 forward of ours and of fla, after warm-up, between cuProfilerStart / cuProfilerStop, for
Nsight Compute's per-kernel table (run on the device):

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --csv --page details \\
        python3 benchmarks/profile_ncu_forward.py [B T H [SETTING=value ...]] > kernels.csv

Settings are kernels.py names as in ab_settings.py (e.g. PIECES_WU=gemm). Inputs as bench_gpu.py's
(K = V = 128, the in-kernel L2 norm). Without ncu it prints each forward's time only.
"""

import ctypes
import sys

import mlx.core as mx

from ab_settings import apply, parse_setting
from bench_gpu import inputs, time_mlx
from mlx_gdn.ops import gated_delta_rule


def main():
    numbers = [a for a in sys.argv[1:] if "=" not in a]
    B, T, H = (int(x) for x in numbers) if numbers else (8, 2048, 32)
    apply(dict(parse_setting(a) for a in sys.argv[1:] if "=" in a))
    q, k, v, g, beta = inputs(B, T, H, 128)
    xs = [mx.array(x).astype(mx.bfloat16) for x in (q, k, v)] + [mx.array(g), mx.array(beta).astype(mx.bfloat16)]
    ours = lambda: gated_delta_rule(*xs, use_qk_l2norm_in_kernel=True, mode="chunk")[0]

    import torch
    import fla.ops.gated_delta_rule as fla_ops
    t = lambda x, dt=torch.bfloat16: torch.tensor(x, device="cuda").to(dt)
    ts = (t(q), t(k), t(v), t(g, torch.float32), t(beta))
    fla = lambda: fla_ops.chunk_gated_delta_rule(*ts, use_qk_l2norm_in_kernel=True)[0]

    print(f"ours {time_mlx(ours, repeats=20):.3f} ms", file=sys.stderr)  # warms up and compiles
    with torch.no_grad():
        for _ in range(3):
            fla()
        torch.cuda.synchronize()
        cuda = ctypes.CDLL("libcuda.so.1")
        cuda.cuProfilerStart()
        mx.eval(ours())
        mx.synchronize()
        fla()
        torch.cuda.synchronize()
        cuda.cuProfilerStop()


if __name__ == "__main__":
    main()
