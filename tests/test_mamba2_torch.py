"""The Mamba2 mixer against an independent PyTorch reference written from mamba_ssm's Mamba2 (its CUDA
kernels cannot be installed here): in_proj split [z, xBC, dt]; causal depthwise conv with bias +
SiLU on xBC; dt = softplus(dt + dt_bias); A = -exp(A_log); the SSD recurrence
h_t = exp(dt A) h_{t-1} + dt x_t B_t^T, y_t = h_t C_t + D x_t (head h reads group h // (H / G));
RMSNormGated with norm_before_gate=False per group of d_inner / G channels; out_proj. Float64,
token by token."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gdn.layers import Mamba2

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_mamba2(x, p, H, P, G, N, eps):
    Bsz, T, _ = x.shape
    d_inner = H * P
    zxbcdt = x @ p["in_proj.weight"].T
    z, xBC, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * G * N, H], dim=-1)
    w = p["conv1d.weight"]  # [C, 1, K]
    xBC = F.conv1d(xBC.transpose(1, 2), w, p["conv1d.bias"], padding=w.shape[-1] - 1,
                   groups=w.shape[0])[..., :T].transpose(1, 2)
    xBC = F.silu(xBC)
    xs, Bm, Cm = torch.split(xBC, [d_inner, G * N, G * N], dim=-1)
    xs, Bm, Cm = xs.view(Bsz, T, H, P), Bm.view(Bsz, T, G, N), Cm.view(Bsz, T, G, N)
    dt = F.softplus(dt + p["dt_bias"])
    A = -torch.exp(p["A_log"])
    h = torch.zeros(Bsz, H, P, N, dtype=x.dtype)
    ys = []
    group = torch.arange(H) // (H // G)
    for t in range(T):
        Bt, Ct = Bm[:, t, group], Cm[:, t, group]  # [B, H, N]
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * xs[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ct) + p["D"][:, None] * xs[:, t])
    y = torch.stack(ys, dim=1).reshape(Bsz, T, d_inner)
    y = (y * F.silu(z)).view(Bsz, T, G, -1)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    y = y.reshape(Bsz, T, d_inner) * p["norm.weight"]
    return y @ p["out_proj.weight"].T


@pytest.mark.parametrize("T,G", [(50, 1), (130, 2)])  # 130 > 2 chunks of 64
def test_mamba2_matches_torch_reference(T, G):
    mx.random.seed(T)
    layer = Mamba2(hidden_size=32, state_size=8, expand=2, head_dim=16, n_groups=G, norm_eps=1e-5)
    params = {k: mx.random.normal(v.shape) * (0.3 if v.ndim > 1 else 0.2) for k, v in tree_flatten(layer.parameters())
              if k not in ("A_log", "dt_bias")}
    params["norm.weight"] = params["norm.weight"] + 1.0
    layer.load_weights(list(params.items()), strict=False)
    x = mx.random.normal((2, T, 32))
    got = np.array(layer(x))
    p = {k: torch.tensor(np.array(v), dtype=torch.float64) for k, v in tree_flatten(layer.parameters())}
    want = torch_mamba2(torch.tensor(np.array(x), dtype=torch.float64), p, layer.num_heads, 16, G, 8, 1e-5).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
