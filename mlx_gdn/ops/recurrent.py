"""The gated delta rule, token by token: the readable reference of the math, and the decode path.

Per batch row and value head, with the state S (K x V, float32):

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t

Inputs here are already prepared by `mlx_gdn.ops.gated_delta_rule`: float32, q scaled (and
L2-normalised if asked), q/k repeated to the value heads, g in log space, beta final.
Autodiff through this loop is exact but builds an O(T) graph; training uses the chunked path.
"""

import mlx.core as mx


def recurrent_gated_delta(q, k, v, g, beta, h0):
    """q, k: [B, T, HV, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; h0: [B, HV, K, V].

    Returns (o [B, T, HV, V], final state [B, HV, K, V]).
    """
    decay = mx.exp(g)
    h = h0
    outs = []
    for t in range(q.shape[1]):
        k_t = k[:, t]
        h = h * decay[:, t, :, None, None]
        predicted = (k_t[..., None, :] @ h)[..., 0, :]  # S^T k: what the state recalls for k_t
        u = beta[:, t, :, None] * (v[:, t] - predicted)
        h = h + k_t[..., :, None] * u[..., None, :]
        outs.append((q[:, t][..., None, :] @ h)[..., 0, :])
    return mx.stack(outs, axis=1), h
