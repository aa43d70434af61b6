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
NAME:TYPE, e.g. k:__nv_bfloat16 (the type MLX passes a bfloat16 array as). --sass also counts the
kernel's SASS instructions by opcode (nvdisasm: `pip install nvidia-cuda-nvdisasm`); a fully unrolled
loop's count is its count a step (the resident scan's static count matched ncu's executed
instructions a chunk, nineteenth session).
"""

import collections
import re
import shutil
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


def _nvdisasm():
    """nvdisasm on PATH, or from the pip package nvidia-cuda-nvdisasm; None without either."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    return next((str(p) for root in nvidia.__path__ for p in Path(root).glob("*/bin/nvdisasm")), None)


def sass_counts(cubin):
    """Instructions of the compiled kernel by opcode (static: an unrolled loop counts each copy)."""
    tool = _nvdisasm()
    if tool is None:
        raise SystemExit("--sass needs nvdisasm: pip install nvidia-cuda-nvdisasm")
    sass = subprocess.run([tool, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    return collections.Counter(ops)


def main():
    args = [a for a in sys.argv[1:] if a != "--sass"]
    name = args[0]
    template = dict(a.split("=", 1) for a in args[1:] if "=" in a)
    types = dict(a.split(":", 1) for a in args[1:] if "=" not in a)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / f"{name}.cu", Path(tmp) / "k.cubin"
        src.write_text(cuda_source(name, template, types))
        proc = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "--resource-usage", "-diag-suppress", "177",
                               "-cubin", str(src), "-o", str(out)], capture_output=True, text=True)
        print("\n".join(line for line in (proc.stdout + proc.stderr).splitlines()
                        if "registers" in line or "spill" in line or "error" in line))
        if proc.returncode == 0 and "--sass" in sys.argv:
            ops = sass_counts(out)
            print(f"{sum(ops.values())} SASS instructions:",
                  ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
