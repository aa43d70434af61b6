"""Kernel bodies for the gated delta rule, one file each, in the Metal subset described in
prelude_metal.h. The same text runs through mx.fast.metal_kernel (Metal), mx.fast.cuda_kernel with
prelude_cuda.h (CUDA), and the CPU emulator in tests/emulator (CI)."""

from pathlib import Path

HERE = Path(__file__).parent
KERNELS = ("decode_step", "chunk_scan", "chunk_scan_mma", "chunk_scan_resident", "chunk_pieces",
           "chunk_output", "chunk_grads", "rows_to_chunks", "chunks_to_rows")


def source(name):
    return (HERE / f"{name}.metal").read_text()


def prelude(backend):
    """The header text for 'metal' or 'cuda'."""
    return (HERE / f"prelude_{backend}.h").read_text()


def kernel_files():
    return sorted(p.stem for p in HERE.glob("*.metal"))
