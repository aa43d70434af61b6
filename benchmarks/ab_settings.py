"""A/B of kernels.py settings on the whole op (run on the device): the bf16 op's forward and compiled
forward + backward under each named variant, alternating in one process, rounds in turn, the
outputs compared with the first variant's; fla after ours in the same process (--fla).

    python benchmarks/ab_settings.py --variant f32 FACTORS_IN_BF16=0 QK_IN_BF16=0 --variant shipped
    python benchmarks/ab_settings.py --variant gemm OUTPUT_KERNEL=gemm --variant kernel --fla

A variant is a name and kernels.py settings (NAME=value: ints, "0"/"1" for booleans, else strings);
unnamed settings keep their shipped values; a dict setting takes NAME=key:value,... over its shipped
entries (CUDA_MIN_THREADGROUPS=chunk_output:2). body:KERNEL=FILE swaps a kernel's body for the text
of FILE (e.g. the previous version of a .metal file: `git show HEAD~1:metal_kernels/X.metal >
old.metal`). Shapes are B,T,H (K = V = 128), bench_gpu's inputs with the in-kernel L2 norm. (The sixteenth session's bf16-intermediate A/Bs were made this way.)
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

import metal_kernels
from bench_gpu import bench_fla, inputs, time_mlx
from mlx_gdn.ops import gated_delta_rule, kernels


_source = metal_kernels.source


def parse_setting(text):
    name, value = text.split("=", 1)
    if name.startswith("body:"):
        return name, Path(value).read_text()
    shipped = getattr(kernels, name)  # an unknown name fails here, not silently
    if isinstance(shipped, dict):  # NAME=key:value,key:value over the shipped entries
        return name, shipped | {k: int(v) if v.isdigit() else v
                                for k, v in (item.split(":") for item in value.split(","))}
    if isinstance(shipped, bool):
        return name, value not in ("0", "false", "False")
    return name, int(value) if isinstance(shipped, int) else value


def apply(settings):
    bodies = {name[5:]: text for name, text in settings.items() if name.startswith("body:")}
    for name, value in settings.items():
        if not name.startswith("body:"):
            setattr(kernels, name, value)
    metal_kernels.source = lambda kernel: bodies.get(kernel) or _source(kernel)
    kernels.forget_kernels()  # built kernels keep the text they were built from


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "SETTING"))
    p.add_argument("--shapes", nargs="*", default=["1,8192,16", "4,4096,16", "8,2048,32"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--fla", action="store_true", help="time fla's chunk_gated_delta_rule too")
    p.add_argument("--out", default="ab_settings.json")
    args = p.parse_args()
    variants = {v[0]: dict(parse_setting(s) for s in v[1:]) for v in args.variant}
    shipped = {name: getattr(kernels, name) for settings in variants.values() for name in settings
               if not name.startswith("body:")}
    fla = None
    if args.fla:
        import torch
        import fla.ops.common.chunk_o as chunk_o
        import fla.ops.gated_delta_rule as fla_ops
        chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only, as bench_gpu.py
        fla = (torch, fla_ops)
    rows = []
    for shape in args.shapes:
        B, T, H = (int(x) for x in shape.split(","))
        data = inputs(B, T, H, 128)
        q, k, v, beta = (mx.array(x).astype(mx.bfloat16) for x in (data[0], data[1], data[2], data[4]))
        xs = (q, k, v, mx.array(data[3]), beta)
        op = lambda *a: gated_delta_rule(*a, use_qk_l2norm_in_kernel=True, mode="chunk")[0]
        w = mx.random.normal(v.shape).astype(mx.bfloat16)
        loss = lambda *a: (op(*a).astype(mx.float32) * w).sum()
        row = {"shape": [B, T, H, 128, 128], "fwd_ms": {}, "fwdbwd_ms": {}, "rel_diff_vs_first": {}}
        first = None
        for rnd in range(args.rounds):
            for name, settings in variants.items():
                apply(shipped)
                apply(settings)
                if rnd == 0:
                    o = op(*xs).astype(mx.float32)
                    first = o if first is None else first
                    row["rel_diff_vs_first"][name] = (mx.sqrt(mx.mean((o - first) ** 2))
                                                      / mx.sqrt(mx.mean(first ** 2))).item()
                row["fwd_ms"].setdefault(name, []).append(
                    round(time_mlx(lambda: op(*xs), repeats=20, pipelined=True), 3))
                if not args.no_backward:
                    step = mx.compile(mx.grad(loss, argnums=[0, 1, 2, 3, 4]))
                    row["fwdbwd_ms"].setdefault(name, []).append(
                        round(time_mlx(lambda: step(*xs), repeats=10, pipelined=True), 3))
                mx.clear_cache()
        apply(shipped)
        if fla is not None:
            timings = [bench_fla(*fla, *data, backward=not args.no_backward) for _ in range(2)]
            row["fla_fwd_ms"] = [t[0] for t in timings]
            row["fla_fwdbwd_ms"] = [t[1] for t in timings]
            fla[0].cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"mlx": mx.__version__, "backend": kernels.backend(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
