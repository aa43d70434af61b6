"""Float64 NumPy forward of fla's Gated DeltaNet LM and its attention hybrids, written from SPEC §2-§3
(and the definition of softmax attention with rotate-half RoPE), from a flat {fla key: array} dict."""

import numpy as np

from reference import gated_delta_reference


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _conv(x, w):
    """Causal depthwise conv, x [B, T, C], w [C, 1, K] (PyTorch layout), then SiLU."""
    K = w.shape[-1]
    padded = np.concatenate([np.zeros((x.shape[0], K - 1, x.shape[2])), x], axis=1)
    out = sum(padded[:, i:i + x.shape[1]] * w[:, 0, i] for i in range(K))
    return _silu(out)


def _gdn(p, x, cfg):
    B, T, _ = x.shape
    H, K = cfg["num_heads"], cfg["head_dim"]
    HV = cfg.get("num_v_heads") or H
    V = int(K * cfg.get("expand_v", 2))
    q = _conv(x @ p["q_proj.weight"].T, p["q_conv1d.weight"]).reshape(B, T, H, K)
    k = _conv(x @ p["k_proj.weight"].T, p["k_conv1d.weight"]).reshape(B, T, H, K)
    v = _conv(x @ p["v_proj.weight"].T, p["v_conv1d.weight"]).reshape(B, T, HV, V)
    o, _ = gated_delta_reference(q, k, v, x @ p["a_proj.weight"].T, x @ p["b_proj.weight"].T,
                                 use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                 A_log=p["A_log"], dt_bias=p["dt_bias"], use_beta_sigmoid_in_kernel=True,
                                 allow_neg_eigval=cfg.get("allow_neg_eigval", False))
    o = _rms(o, p["o_norm.weight"], cfg["norm_eps"])
    o = o * _silu((x @ p["g_proj.weight"].T).reshape(B, T, HV, V))
    return o.reshape(B, T, -1) @ p["o_proj.weight"].T


def _mamba2(p, x, cfg):
    """Mamba2 mixer from its definition: a float64 token loop over S_t = e^{dt A} S + dt x B^T."""
    Bsz, T, h = x.shape
    d_inner, N, G, P = cfg["mamba_expand"] * h, cfg["mamba_state_size"], cfg["mamba_n_groups"], cfg["mamba_head_dim"]
    H = d_inner // P
    zxbcdt = x @ p["in_proj.weight"].T
    z, xBC, dt = zxbcdt[..., :d_inner], zxbcdt[..., d_inner:2 * d_inner + 2 * G * N], zxbcdt[..., -H:]
    K = p["conv1d.weight"].shape[-1]
    padded = np.concatenate([np.zeros((Bsz, K - 1, xBC.shape[2])), xBC], axis=1)
    xBC = _silu(sum(padded[:, i:i + T] * p["conv1d.weight"][:, 0, i] for i in range(K)) + p["conv1d.bias"])
    xs = xBC[..., :d_inner].reshape(Bsz, T, H, P)
    Bm = xBC[..., d_inner:d_inner + G * N].reshape(Bsz, T, G, N)
    Cm = xBC[..., d_inner + G * N:].reshape(Bsz, T, G, N)
    dt = np.log1p(np.exp(dt + p["dt_bias"]))
    A = -np.exp(p["A_log"])
    y = np.zeros((Bsz, T, H, P))
    for b in range(Bsz):
        for hh in range(H):
            g = hh // (H // G)
            S = np.zeros((P, N))
            for t in range(T):
                S = np.exp(dt[b, t, hh] * A[hh]) * S + dt[b, t, hh] * np.outer(xs[b, t, hh], Bm[b, t, g])
                y[b, t, hh] = S @ Cm[b, t, g] + p["D"][hh] * xs[b, t, hh]
    y = y.reshape(Bsz, T, d_inner) * _silu(z)
    y = y.reshape(Bsz, T, G, -1)
    y = (y / np.sqrt((y * y).mean(-1, keepdims=True) + cfg["norm_eps"])).reshape(Bsz, T, d_inner)
    return (y * p["norm.weight"]) @ p["out_proj.weight"].T


def _rope(x, theta):
    """Rotate-half RoPE on x [B, T, heads, d] at positions 0..T-1."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(x.shape[1])[:, None] * inv[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(p, x, heads, kv_heads, window, theta):
    B, T, h = x.shape
    d = h // heads
    q = _rope((x @ p["q_proj.weight"].T).reshape(B, T, heads, d), theta)
    k = _rope((x @ p["k_proj.weight"].T).reshape(B, T, kv_heads, d), theta)
    v = (x @ p["v_proj.weight"].T).reshape(B, T, kv_heads, d)
    rep = heads // kv_heads
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d)
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    allowed = (j <= i) & ((j > i - window) if window else True)
    scores = np.where(allowed, scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    scores /= scores.sum(-1, keepdims=True)
    out = np.einsum("bhij,bjhd->bihd", scores, v).reshape(B, T, -1)
    return out @ p["o_proj.weight"].T


def model_reference(weights, cfg, input_ids):
    """weights: {fla state-dict key: np.float64 array}; cfg: our ModelArgs fields as a dict."""
    w = weights
    x = w["model.embeddings.weight"][np.asarray(input_ids)]
    eps = cfg["norm_eps"]
    for i, kind in enumerate(cfg["layer_types"]):
        pre = f"model.layers.{i}."
        sub = {n[len(pre) + 5:]: a for n, a in w.items() if n.startswith(pre + "attn.")}
        h = _rms(x, w[pre + "attn_norm.weight"], eps)
        if kind == "gdn":
            x = x + _gdn(sub, h, cfg)
        elif kind == "mamba2":
            x = x + _mamba2(sub, h, cfg)
        else:
            x = x + _attention(sub, h, cfg["attn_num_heads"] or cfg["num_heads"],
                               cfg["attn_num_kv_heads"] or cfg["attn_num_heads"] or cfg["num_heads"],
                               cfg["window_size"] if kind == "swa" else None, cfg["rope_theta"])
        h = _rms(x, w[pre + "mlp_norm.weight"], eps)
        gate, up = h @ w[pre + "mlp.gate_proj.weight"].T, h @ w[pre + "mlp.up_proj.weight"].T
        x = x + (_silu(gate) * up) @ w[pre + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embeddings.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T
