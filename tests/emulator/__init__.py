"""CPU emulator for the kernel bodies in metal_kernels/: compiles a body as C++ against shim.h and
runs its whole grid, every GPU thread a fiber (see shim.h), twice: threads in order and in reverse
order, whose results must be equal (a race shows as a difference). Called like the function that
mx.fast.metal_kernel returns, so the code that launches kernels runs unchanged on it.

    kernel = EmulatedKernel(name, input_names, output_names, source)
    outs = kernel(inputs=[...], template=[("K", 64), ("InT", mx.float32)], grid=(32, V, R),
                  threadgroup=(32, 4, 1), output_shapes=[...], output_dtypes=[...])
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).parent
CACHE = Path(os.environ.get("MLX_GDN_EMULATOR_CACHE", Path(tempfile.gettempdir()) / "mlx_gdn_emulator"))

C_TYPES = {mx.float32: "float", mx.bfloat16: "bfloat16_t", mx.float16: "half", mx.int32: "int",
           mx.uint32: "uint", mx.bool_: "bool"}
NP_VIEW = {mx.float32: np.float32, mx.bfloat16: np.uint16, mx.float16: np.float16,
           mx.int32: np.int32, mx.uint32: np.uint32, mx.bool_: np.bool_}

executed = set()  # kernel names run so far (the tests check that every .metal file ran)


def _to_numpy(x):
    """Raw row-contiguous bytes of an mx.array, in a NumPy array of the same element size."""
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16))
    return np.ascontiguousarray(np.array(x))


def _from_numpy(a, dtype):
    if dtype == mx.bfloat16:
        return mx.array(a).view(mx.bfloat16)
    return mx.array(a)


class EmulatedKernel:
    def __init__(self, name, input_names, output_names, source, header="", **_):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.source, self.header = source, header
        self._libs = {}

    def _code(self, in_dtypes, out_dtypes, template):
        lines = [self.header, '#include "shim.h"', "namespace kern {"]  # the header: mode macros
        for n, dt in zip(self.input_names, in_dtypes):
            lines.append(f"static const {C_TYPES[dt]}* {n};")
        for n, dt in zip(self.output_names, out_dtypes):
            lines.append(f"static {C_TYPES[dt]}* {n};")
        lines.append("static void body() {")
        for n, value in template:
            if isinstance(value, bool):
                lines.append(f"  constexpr bool {n} = {'true' if value else 'false'};")
            elif isinstance(value, int):
                lines.append(f"  constexpr int {n} = {value};")
            else:
                lines.append(f"  using {n} = {C_TYPES[value]};")
        lines += [self.source, "}", "}  // namespace kern",
                  'extern "C" int launch(void** bufs, const int* dims, char* err, int err_len) {']
        for i, n in enumerate(self.input_names + self.output_names):
            lines.append(f"  kern::{n} = reinterpret_cast<decltype(kern::{n})>(bufs[{i}]);")
        lines += ["  return emu::run_grid(kern::body, dims, err, err_len);", "}"]
        return "\n".join(lines)

    def _library(self, code):
        key = hashlib.sha256((code + (HERE / "shim.h").read_text()).encode()).hexdigest()[:24]
        if key not in self._libs:
            CACHE.mkdir(parents=True, exist_ok=True)
            lib = CACHE / f"{self.name}_{key}.so"
            if not lib.exists():
                src = CACHE / f"{self.name}_{key}.cpp"
                src.write_text(code)
                tmp = lib.with_suffix(f".{os.getpid()}.tmp")
                cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{HERE}", str(src),
                       "-o", str(tmp)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"emulator: compiling kernel {self.name} failed:\n"
                                       f"{proc.stderr[-4000:]}")
                os.replace(tmp, lib)
            self._libs[key] = ctypes.CDLL(str(lib))
        return self._libs[key]

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(),
                 init_value=None, verbose=False, stream=None):
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        code = self._code([x.dtype for x in inputs], output_dtypes, template)
        lib = self._library(code)
        in_np = [_to_numpy(x) for x in inputs]
        results = [self._run(lib, in_np, output_shapes, output_dtypes, init_value, grid, threadgroup, rev)
                   for rev in (False, True)]
        for a, b in zip(*results):
            if a.tobytes() != b.tobytes():
                raise RuntimeError(f"emulator: kernel {self.name}: results depend on the order threads run "
                                   "in (a race: a missing barrier or SIMD-group synchronisation)")
        out_np = results[0]
        executed.add(self.name)
        return [_from_numpy(a, dt) for a, dt in zip(out_np, output_dtypes)]

    def _run(self, lib, in_np, output_shapes, output_dtypes, init_value, grid, threadgroup, reverse):
        fill = 0 if init_value is None else init_value
        out_np = [np.full(shape, fill, dtype=NP_VIEW[dt]) for shape, dt in zip(output_shapes, output_dtypes)]
        if init_value is None:  # poison: an element the kernel forgets to write shows up as NaN/garbage
            for a in out_np:
                a.view(np.uint8).fill(0xFF)
        bufs = (ctypes.c_void_p * (len(in_np) + len(out_np)))(*[a.ctypes.data for a in in_np + out_np])
        dims = (ctypes.c_int * 7)(*grid, *threadgroup, int(reverse))
        err = ctypes.create_string_buffer(512)
        if lib.launch(bufs, dims, err, 512) != 0:
            raise RuntimeError(f"emulator: kernel {self.name}: {err.value.decode()}")
        return out_np
