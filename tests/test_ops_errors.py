"""Bad input to gated_delta_rule: one ValueError naming the argument, what was expected and what came."""

import mlx.core as mx
import pytest

from mlx_gdn.ops import gated_delta_rule


def arrays(B=1, T=10, H=2, HV=4, K=8, V=8):
    return dict(q=mx.zeros((B, T, H, K)), k=mx.zeros((B, T, H, K)), v=mx.zeros((B, T, HV, V)),
                g=mx.zeros((B, T, HV)), beta=mx.zeros((B, T, HV)))


def expect_error(match, **overrides):
    kw = arrays()
    kw.update(overrides)
    with pytest.raises(ValueError, match=match):
        gated_delta_rule(**kw)


def test_mismatched_k():
    expect_error(r"`k` must be of shape \(1, 10, 2, 8\), got \(1, 10, 2, 4\)", k=mx.zeros((1, 10, 2, 4)))


def test_q_not_4d():
    expect_error(r"`q` must be 4-D", q=mx.zeros((10, 2, 8)))


def test_v_wrong_length():
    expect_error(r"`v` must be 4-D \[B, T, HV, V\] with B, T = 1, 10, got shape \(1, 9, 4, 8\)",
                 v=mx.zeros((1, 9, 4, 8)))


def test_value_heads_not_multiple():
    expect_error(r"`v` must be a number of value heads HV divisible by the 2 q/k heads, got HV = 3",
                 v=mx.zeros((1, 10, 3, 8)), g=mx.zeros((1, 10, 3)), beta=mx.zeros((1, 10, 3)))


def test_gate_and_beta_shapes():
    expect_error(r"`g` must be of shape \(1, 10, 4\), got \(1, 10, 2\)", g=mx.zeros((1, 10, 2)))
    expect_error(r"`beta` must be of shape \(1, 10, 4\), got \(1, 10\)", beta=mx.zeros((1, 10)))


def test_wrong_state_shape():
    expect_error(r"`initial_state` must be \[N, HV, K, V\] = \(1, 4, 8, 8\), got \(1, 4, 8, 4\)",
                 initial_state=mx.zeros((1, 4, 8, 4)))
    expect_error(r"`initial_state` must be \[N, HV, V, K\] = \(1, 4, 6, 8\)",
                 v=mx.zeros((1, 10, 4, 6)), initial_state=mx.zeros((1, 4, 8, 6)), state_v_first=True)


@pytest.mark.parametrize("cu", [[0, 5, 5, 10], [0, 4, 9], [1, 10], [0, 6, 3, 10], [0]])
def test_bad_cu_seqlens(cu):
    expect_error(r"`cu_seqlens` must be strictly increasing offsets from 0 to T = 10", cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    expect_error(r"`q` must be of batch size 1 when cu_seqlens is given.*got B = 2",
                 cu_seqlens=[0, 10], **arrays(B=2))


def test_state_count_follows_cu_seqlens():
    expect_error(r"`initial_state` must be .* = \(3, 4, 8, 8\), got \(1, 4, 8, 8\)",
                 cu_seqlens=mx.array([0, 2, 5, 10]), initial_state=mx.zeros((1, 4, 8, 8)))


def test_chunk_size_and_mode():
    expect_error(r"`chunk_size` must be one of \(16, 32, 64\), got 128", chunk_size=128)
    expect_error(r"`mode` must be one of \('auto', 'chunk', 'recurrent'\), got 'fast'", mode="fast")


def test_dtype_and_type():
    expect_error(r"`q` must be float32, bfloat16 or float16, got .*int32", q=mx.zeros((1, 10, 2, 8), mx.int32))
    expect_error(r"`g` must be an mx.array, got list", g=[0.0])


def test_gate_parameters():
    expect_error(r"`A_log` must be given when use_gate_in_kernel=True, got None", use_gate_in_kernel=True)
    expect_error(r"`A_log` must be of shape \(4,\), got \(2,\)", use_gate_in_kernel=True,
                 A_log=mx.zeros((2,)))
    expect_error(r"`dt_bias` must be of shape \(4,\), got \(4, 1\)", use_gate_in_kernel=True,
                 A_log=mx.zeros((4,)), dt_bias=mx.zeros((4, 1)))


def test_empty_sequence():
    expect_error(r"at least one token", **arrays(T=0))
