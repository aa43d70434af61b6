"""Registers, spills and shared memory of a kernel body as CUDA compiles it, without a GPU: the body is
wrapped with the CUDA prelude the way mx.fast.cuda_kernel wraps it (template values as constants) and
compiled by nvcc/ptxas for sm_90. Costs no device time; occupancy follows from the numbers (an H100
SM has 65,536 registers and 228 KB of shared memory).

    python benchmarks/cuda_resource_usage.py chunk_pieces K=128 V=128 C=64 THREADS=256 KC=32 CS=68 TS=68 \\
        ALL_PIECES=false WT=float PT=float
    python benchmarks/cuda_resource_usage.py chunk_scan_mma K=128 V=128 C=64 THREADS=512 \\
        BV=16 CB=32 KS=4 REVERSE=false HAS_Y=false AST=132 BST=36 HST=24

The kernel's launch bounds are those kernels.CUDA_MIN_THREADGROUPS gives it (THREADS threads);
MIN_THREADGROUPS=N sets them instead (0: none); BF16_PRODUCTS=true compiles the BF16 multiply
mode (kernels.get_kernel's bf16_products). Buffers are float (int for indices) unless typed as
NAME:TYPE, e.g. k:__nv_bfloat16 (the type MLX passes a bfloat16 array as).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metal_kernels  # noqa: E402
from mlx_gdn.ops import kernels  # noqa: E402


INT_INPUTS = {"seg_start", "seg_end", "src", "dst", "dims"}  # every other buffer is float here


def _constant(name, value):
    if value in ("true", "false"):
        return f"  constexpr bool {name} = {value};"
    if value.lstrip("-").isdigit():
        return f"  constexpr int {name} = {value};"
    return f"  using {name} = {value};"  # a type (decode_step's InT=float)


def cuda_source(name, template, types=()):
    template, types = dict(template), dict(types)
    blocks = template.pop("MIN_THREADGROUPS", None)
    bf16_products = template.pop("BF16_PRODUCTS", "false") == "true"
    header = kernels.cuda_header(name, template.get("THREADS"), None if blocks is None else int(blocks),
                                 bf16_products)
    inputs, outputs = kernels.SPECS[name]
    consts = "\n".join(_constant(k, v) for k, v in template.items())
    typed = lambda n: types.get(n, "int" if n in INT_INPUTS else "float")
    args = ", ".join([f"const {typed(n)}* {n}" for n in inputs] + [f"{typed(n)}* {n}" for n in outputs])
    return (f"#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n{header}\n"
            f"__global__ void {name}({args}) {{\n{consts}\n"
            f"{metal_kernels.source(name)}\n}}\n")


def main():
    name = sys.argv[1]
    template = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    types = dict(a.split(":", 1) for a in sys.argv[2:] if "=" not in a)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{name}.cu"
        src.write_text(cuda_source(name, template, types))
        proc = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "--resource-usage", "-diag-suppress", "177",
                               "-c", str(src), "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
    print("\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                    if "registers" in line or "spill" in line or "error" in line))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
