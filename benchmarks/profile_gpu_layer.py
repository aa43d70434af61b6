"""Where a model's prefill time goes on the GPU: the whole forward, one block's GDN layer and MLP, and
the GDN op alone at the layer's shapes (run on the device machine).

    PYTHONPATH=.:benchmarks python benchmarks/profile_gpu_layer.py [preset] [T]
"""

import json
import sys

import mlx.core as mx

from bench_gpu import random_model, time_mlx
from mlx_gdn.ops import gated_delta_rule


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "gdn-1.3b"
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    model = random_model(name)
    ids = mx.random.randint(0, model.args.vocab_size, (1, T))
    out = {"preset": name, "T": T, "model_ms": time_mlx(lambda: model(ids), repeats=3)}
    block = model.model.layers[0]
    x = mx.random.normal((1, T, model.args.hidden_size)).astype(mx.bfloat16) * 0.1
    out["gdn_layer_ms"] = time_mlx(lambda: block.attn(x), repeats=5)
    out["mlp_ms"] = time_mlx(lambda: block.mlp(x), repeats=5)
    layer = block.attn
    H, HV, K, V = layer.num_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    q, k = (mx.random.normal((1, T, H, K)).astype(mx.bfloat16) for _ in range(2))
    v = mx.random.normal((1, T, HV, V)).astype(mx.bfloat16)
    a, b = mx.random.normal((1, T, HV)), mx.random.normal((1, T, HV))
    out["op_ms"] = time_mlx(lambda: gated_delta_rule(
        q, k, v, a, b, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=layer.A_log,
        dt_bias=layer.dt_bias, use_beta_sigmoid_in_kernel=True)[0], repeats=5)
    out["shape"] = [1, T, H, HV, K, V]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
