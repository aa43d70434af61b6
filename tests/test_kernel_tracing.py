"""The kernel path's graph under mx.compile, on the CPU: kernels that only trace.

On Metal and CUDA the chunked op runs under mx.compile with the kernels as graph nodes; the
emulator runs each kernel at once, which tracing cannot do, so its tests turn compilation off.
Here each kernel is replaced by MLX ops that read every input and return the output shapes, so
that mx.compile traces the same arguments and closures as on a GPU (the values are not the
point: the emulator and GPU tests check them): the op's own compiled forward (with and without a
gradient), a caller's compiled decode step, and a training step compiled whole over packed
sequences, as train.py runs it. MLX refuses a compiled function that reads one of
its own inputs from a closure as well: the scans' unread Y was once kernels.zeros(8), also the
absent gate parameters' input with 8 value heads (found on the H100, not here, before this test).
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gdn.ops import gated_delta, gated_delta_rule, kernels
from reference import make_inputs


class TracingKernel:
    """mx.fast.metal_kernel's interface; outputs are zeros that depend on every input."""

    traced = set()

    def __init__(self, name, input_names, output_names, source, header="", **_):
        self.name = name

    def __call__(self, inputs, output_shapes, output_dtypes, **_):
        TracingKernel.traced.add(self.name)
        touch = sum(mx.sum(x.astype(mx.float32)) for x in inputs) * 0
        return [mx.zeros(s, dtype=d) + touch.astype(d) for s, d in zip(output_shapes, output_dtypes)]


@pytest.fixture
def tracing(monkeypatch):
    monkeypatch.setattr(gated_delta, "_whole_op_fns", {})
    monkeypatch.setattr(TracingKernel, "traced", set())
    monkeypatch.setattr(kernels, "OUTPUT_KERNEL", "kernel")  # else GEMMs in float32
    kernels.forget_kernels()
    with kernels.use_factory("cuda", TracingKernel):
        yield
    kernels.forget_kernels()


@pytest.mark.parametrize("with_grads", [False, True])
def test_kernel_path_traces_under_compile(tracing, with_grads):
    for HV in (4, 8):  # 8 value heads: absent gate parameters are kernels.zeros(8)
        data = {n: mx.array(x) for n, x in make_inputs(5, 1, 70, 2, HV, 32, h0=True).items()}

        def loss(q, k, v):
            o, s = gated_delta_rule(q, k, v, data["g"], data["beta"], initial_state=data["initial_state"],
                                    output_final_state=True, mode="chunk", chunk_size=16)
            return (o * o).sum() + s.sum(), (o, s)

        if with_grads:
            (_, (o, s)), dq = mx.value_and_grad(loss)(data["q"], data["k"], data["v"])
            mx.eval(dq)
            assert dq.shape == data["q"].shape
        else:
            _, (o, s) = loss(data["q"], data["k"], data["v"])
        mx.eval(o, s)
        assert o.shape == data["v"].shape and s.shape == (1, HV, 32, 32)
        assert np.isfinite(np.array(o)).all()
    for kernel in ("chunk_pieces", "chunk_scan", "chunk_output") + (("chunk_grads",) if with_grads else ()):
        assert any(name.startswith(kernel) for name in TracingKernel.traced), TracingKernel.traced
    assert len(gated_delta._whole_op_fns) == 1  # it ran compiled (traced anew for the second shapes)


def test_decode_step_traces_under_compile(tracing):
    # a caller's compiled decode step (a model's), absent gate parameters as inputs at 8 value heads
    for HV in (4, 8):
        data = {n: mx.array(x) for n, x in make_inputs(6, 2, 3, 2, HV, 32, h0=True, n_states=2).items()}
        step = mx.compile(lambda q, k, v, g, beta, h: gated_delta_rule(
            q, k, v, g, beta, initial_state=h, output_final_state=True, mode="recurrent"))
        o, s = step(data["q"], data["k"], data["v"], data["g"], data["beta"], data["initial_state"])
        mx.eval(o, s)
        assert o.shape == data["v"].shape and s.shape == (2, HV, 32, 32)
    assert any(name.startswith("decode_step") for name in TracingKernel.traced), TracingKernel.traced


def test_packed_training_step_traces_under_compile(tracing):
    # as train.py compiles its step: value_and_grad under mx.compile, packed sequences
    for HV in (4, 8):
        data = {n: mx.array(x) for n, x in make_inputs(7, 1, 60, 2, HV, 32, h0=True, n_states=3).items()}
        cu = mx.array([0, 9, 40, 60])

        def loss(q, k, v):
            o, s = gated_delta_rule(q, k, v, data["g"], data["beta"], initial_state=data["initial_state"],
                                    output_final_state=True, cu_seqlens=cu, chunk_size=16)
            return (o * o).sum() + s.sum()

        value, grads = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))(data["q"], data["k"], data["v"])
        mx.eval(value, grads)
        assert [g.shape for g in grads] == [data[n].shape for n in "qkv"]
    for kernel in ("chunk_pieces", "chunk_scan", "chunk_grads", "rows_to_chunks"):
        assert any(name.startswith(kernel) for name in TracingKernel.traced), TracingKernel.traced
