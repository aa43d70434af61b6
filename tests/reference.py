"""Float64 NumPy oracle of the gated delta rule, written from the formula (SPEC §1), not from mlx_gdn.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (scale q_t)
"""

import numpy as np


def _softplus(x):
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def gated_delta_reference(q, k, v, g, beta, *, scale=None, initial_state=None,
                          use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None,
                          dt_bias=None, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                          cu_seqlens=None):
    """All arrays NumPy; returns (o [B,T,HV,V], final states [N,HV,K,V]) in float64."""
    q, k, v, g, beta = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    group = HV // H
    if use_qk_l2norm_in_kernel:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    if use_gate_in_kernel:
        bias = 0.0 if dt_bias is None else np.asarray(dt_bias, np.float64)
        g = -np.exp(np.asarray(A_log, np.float64)) * _softplus(g + bias)
    if use_beta_sigmoid_in_kernel:
        beta = 1.0 / (1.0 + np.exp(-beta))
    if allow_neg_eigval:
        beta = 2.0 * beta
    scale = K ** -0.5 if scale is None else scale

    if cu_seqlens is None:
        rows = [(b, 0, T) for b in range(B)]
    else:
        c = list(cu_seqlens)
        rows = [(0, c[i], c[i + 1]) for i in range(len(c) - 1)]
    o = np.zeros((B, T, HV, V))
    finals = np.zeros((len(rows), HV, K, V))
    for n, (b, start, end) in enumerate(rows):
        for h in range(HV):
            hk = h // group
            S = np.zeros((K, V)) if initial_state is None else np.array(initial_state[n, h], np.float64)
            for t in range(start, end):
                kt, vt = k[b, t, hk], v[b, t, h]
                S = np.exp(g[b, t, h]) * (S - beta[b, t, h] * np.outer(kt, kt @ S)) \
                    + beta[b, t, h] * np.outer(kt, vt)
                o[b, t, h] = S.T @ (scale * q[b, t, hk])
            finals[n, h] = S
    return o, finals


def rms_rel(ref, x):
    """||ref - x||_2 / ||ref||_2, the measure of fla's assert_close."""
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    return np.sqrt(((ref - x) ** 2).sum()) / max(np.sqrt((ref ** 2).sum()), 1e-30)


def assert_close(name, ref, x, tol):
    """fla's assert_close: passes when max|ref - x| <= 1e-6, else needs rms_rel(ref, x) < tol."""
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    assert np.isfinite(x).all(), f"{name}: non-finite values"
    if np.abs(ref - x).max() <= 1e-6:
        return
    err = rms_rel(ref, x)
    assert err < tol, f"{name}: RMS-relative error {err:.3e} >= {tol:.1e}"


def make_inputs(seed, B, T, H, HV, K, V=None, *, normalizer=1.0, mask_p=0.0, h0=False, n_states=None,
                unit_k=True):
    """Random inputs in fla's test style: g = logsigmoid(U(0,1)) / normalizer, zeroed with prob mask_p;
    k rows of unit norm (as fla's tests make them) unless unit_k=False (for the in-kernel L2 norm)."""
    V = K if V is None else V
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    if unit_k:
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, HV, V)).astype(np.float32)
    g = (-np.log1p(np.exp(-rng.uniform(0, 1, (B, T, HV)))) / normalizer).astype(np.float32)
    g[rng.random(g.shape) < mask_p] = 0.0
    beta = rng.uniform(0, 1, (B, T, HV)).astype(np.float32)
    state = None
    if h0:
        state = rng.standard_normal((n_states or B, HV, K, V)).astype(np.float32)
    return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=state)
