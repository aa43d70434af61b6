"""The Metal runner's source, checked without a Mac: a kernel body wrapped as mx.fast.metal_kernel
wraps it (MLX's write_signature: the prelude, `template <...>`, `[[kernel]] void name(...)` with
each input `const device T*` or, under 8 elements, `const constant T*`, outputs `device T*`, the
Metal attributes the body names, the explicit instantiation), then parsed by clang (libclang) against
metal_mock.h, a stand-in for the Metal standard library as the MSL specification declares it.
Type and overload errors (address spaces, a float matrix loaded from bfloat16 memory, a helper
the prelude lacks, a template value that does not fit) fail here as they would in Metal's compiler,
and so do threadgroup arrays over Metal's 32 KB at the launch's template values, and launches of
more than 1024 threads a threadgroup; what only the GPU decides (codegen, a pipeline's lower thread
limit, speed) is not checked.

    kernel = MetalCheckedKernel(name, input_names, output_names, source)   # as EmulatedKernel
    outs = kernel(inputs=[...], template=[...], grid=..., threadgroup=..., ...)

checks the Metal source of each launch (once a text), then runs the launch on the emulator.
"""

import re

import mlx.core as mx

import metal_kernels
from emulator import HERE, EmulatedKernel

MLX_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.int32: "int32_t",
             mx.uint32: "uint32_t", mx.bool_: "bool"}
CONSTANT_BELOW = 8  # MLX passes inputs of fewer elements in the constant address space
THREADGROUP_LIMIT = 32768  # bytes of threadgroup memory a Metal kernel may declare
THREADS_LIMIT = 1024  # threads a Metal threadgroup may have (Apple GPUs; fewer for a heavy pipeline)
# MLX's Metal attributes: each is a kernel argument where the body's text contains its name
ATTRIBUTES = {"dispatch_quadgroups_per_threadgroup": "uint", "dispatch_simdgroups_per_threadgroup": "uint",
              "dispatch_threads_per_threadgroup": "uint3", "grid_origin": "uint3", "grid_size": "uint3",
              "quadgroup_index_in_threadgroup": "uint", "quadgroups_per_threadgroup": "uint",
              "simdgroup_index_in_threadgroup": "uint", "simdgroups_per_threadgroup": "uint",
              "thread_execution_width": "uint", "thread_index_in_quadgroup": "uint",
              "thread_index_in_simdgroup": "uint", "thread_index_in_threadgroup": "uint",
              "thread_position_in_grid": "uint3", "thread_position_in_threadgroup": "uint3",
              "threadgroup_position_in_grid": "uint3", "threadgroups_per_grid": "uint3",
              "threads_per_grid": "uint3", "threads_per_simdgroup": "uint", "threads_per_threadgroup": "uint3"}
checked = {}  # kernel name -> the Metal sources that passed
launched = []  # the kernel of each launch, in order


def _template_value(value):
    if isinstance(value, bool):
        return str(int(value))  # MLX streams bools as 1 / 0
    return str(value) if isinstance(value, int) else MLX_TYPES[value]


def kernel_source(name, input_names, output_names, body, header, inputs, output_dtypes, template):
    """The text mx.fast.metal_kernel compiles for this launch."""
    values = [_template_value(v) for _, v in template]
    kernel_name = f"custom_kernel_{name}"
    if template:  # MLX: "<a, b>" with "<", ">" and ", " made "_", the last dropped
        kernel_name += "__" + "_".join(values)
    for x in inputs:
        kernel_name += "_" + MLX_TYPES[x.dtype] + ("s" if x.ndim == 0 else "c" if x.size < CONSTANT_BELOW else "")
    kernel_name += "".join("_" + MLX_TYPES[dt] for dt in output_dtypes)
    params = []
    for n, x in zip(input_names, inputs):
        space = "constant" if x.size < CONSTANT_BELOW else "device"
        params.append(f"  const {space} {MLX_TYPES[x.dtype]}{'&' if x.ndim == 0 else '*'} {n}")
        for suffix, kind in (("_shape", "const constant int*"), ("_strides", "const constant int64_t*"),
                             ("_ndim", "const constant int&")):
            if n + suffix in body:
                params.append(f"  {kind} {n}{suffix}")
    params += [f"  device {MLX_TYPES[dt]}* {n}" for n, dt in zip(output_names, output_dtypes)]
    params = [f"{p} [[buffer({i})]]" for i, p in enumerate(params)]
    params += [f"  {kind} {attr} [[{attr}]]" for attr, kind in ATTRIBUTES.items() if attr in body]
    text = header
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
                 for _, v in template]
        text += "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
    text += f"[[kernel]] void {kernel_name}(\n" + ",\n".join(params) + ") {\n" + body + "\n}\n"
    if template:
        instance = f"{kernel_name}<{', '.join(values)}>"
        text += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({instance}) {instance};\n'
    return text


def clang_errors(text):
    """clang's errors for a Metal source (metal_mock.h before it, as MLX puts its utils first), each
    with the line it names."""
    import clang.cindex

    # what clang cannot take as Metal does: kernel-scope threadgroup variables (static here), and
    # attributes on an explicit instantiation (Metal's host_name); after the last threadgroup
    # declaration, Metal's limit on their total, checked at the instantiation's template values
    declared = list(re.finditer(r"(?m)^(\s*)threadgroup\s+\w+\s+(\w+)\s*\[.*?;.*$", text))
    if declared:
        total = " + ".join(f"sizeof({d.group(2)})" for d in declared)
        at = declared[-1].end()
        text = (text[:at] + f'\nstatic_assert({total} <= {THREADGROUP_LIMIT}, "threadgroup memory over '
                f'Metal\'s {THREADGROUP_LIMIT} bytes");' + text[at:])
    text = re.sub(r"(?m)^(\s*)threadgroup\s", r"\1static threadgroup ", text)
    text = re.sub(r"(?m)^template \[\[host_name\(\"\w+\"\)\]\] \[\[kernel\]\] ", "template ", text)
    source = f'#include "{HERE / "metal_mock.h"}"\n' + text
    headers = [(f"/metal/{h}", f'#include "{HERE / "metal_mock.h"}"\n')
               for h in ("metal_stdlib", "metal_simdgroup_matrix")]
    args = ["-x", "c++", "-std=c++14", "-Werror=c++17-extensions",  # MSL is C++14-based
            "-I/metal", "-Wno-unknown-attributes"]
    unit = clang.cindex.Index.create().parse("kernel.metal.cpp", args=args,
                                             unsaved_files=[("kernel.metal.cpp", source)] + headers)
    lines, errors = source.splitlines(), []
    for d in unit.diagnostics:
        if d.severity >= clang.cindex.Diagnostic.Error:
            here = d.location.file is not None and d.location.file.name == "kernel.metal.cpp"
            errors.append(f"line {d.location.line}: {d.spelling}\n    {lines[d.location.line - 1].strip()}"
                          if here else d.spelling)
    return errors


class MetalCheckedKernel(EmulatedKernel):
    """EmulatedKernel that first checks the launch's Metal source (metal_kernels' Metal prelude as its
    header, whatever header the launcher gave the emulator)."""

    def __call__(self, inputs, output_shapes, output_dtypes, grid, threadgroup, template=(), **launch):
        inputs = [x if isinstance(x, mx.array) else mx.array(x) for x in inputs]
        launched.append(self.name.rsplit("_", 1)[0])
        threads = threadgroup[0] * threadgroup[1] * threadgroup[2]
        if threads > THREADS_LIMIT:
            raise RuntimeError(f"{self.name}: a threadgroup of {threads} threads, over Metal's {THREADS_LIMIT}")
        text = kernel_source(self.name, self.input_names, self.output_names, self.source,
                             metal_kernels.prelude("metal"), inputs, output_dtypes, template)
        if text not in checked.get(self.name, ()):
            errors = clang_errors(text)
            if errors:
                raise RuntimeError(f"Metal source of {self.name} does not compile:\n" + "\n".join(errors[:8]))
            checked.setdefault(self.name, set()).add(text)
        return super().__call__(inputs, output_shapes, output_dtypes, grid, threadgroup, template, **launch)
