"""Where a training step's GPU time goes (run on the device machine): the whole step and its parts,
then the same model with the GDN op replaced by the identity (o = v), one block's layers forward +
backward, and the loss head alone. Each part forced to finish (mx.eval) before the next starts.

    PYTHONPATH=.:benchmarks python benchmarks/profile_gpu_train.py [preset] [T]
"""

import json
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import mlx_gdn.layers.gated_deltanet as gdn_layer
from bench_gpu import random_model, time_mlx
from mlx_gdn.train import compiled_update, compiled_value_and_grad, loss_fn


def timed(out, name, fn, repeats=3):
    mx.reset_peak_memory()
    out[f"{name}_ms"] = round(time_mlx(fn, repeats=repeats, warmup=1), 2)
    out[f"{name}_peak_gb"] = round(mx.get_peak_memory() / 1e9, 2)
    print(json.dumps({name: out[f"{name}_ms"], "peak_gb": out[f"{name}_peak_gb"]}), flush=True)


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "gdn-0.4b"
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    model = random_model(name)
    ids = mx.random.randint(0, model.args.vocab_size, (1, T + 1))
    x, y, w = ids[:, :-1], ids[:, 1:], mx.ones((1, T))
    grad = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(1e-4)
    opt.init(model.trainable_parameters())
    update = compiled_update(model, opt, grad_clip=0.0)

    compiled = compiled_value_and_grad(model)

    def step():
        loss, grads = compiled(x, y, w)  # as train.py for rows without document boundaries
        mx.eval(loss, grads)
        update(grads)
        return model.parameters(), opt.state

    out = {"preset": name, "T": T}
    timed(out, "step", step)
    timed(out, "forward", lambda: model(x))
    timed(out, "forward_loss", lambda: loss_fn(model, x, y, w))
    timed(out, "value_and_grad", lambda: grad(model, x, y, w))
    timed(out, "value_and_grad_compiled", lambda: compiled(x, y, w))
    grads = grad(model, x, y, w)[1]
    mx.eval(grads)
    timed(out, "optimizer_update", lambda: (update(grads), model.parameters(), opt.state)[1:])
    timed(out, "optimizer_update_uncompiled", lambda: (opt.update(model, grads), model.parameters(), opt.state)[1:])

    block = model.model.layers[0]
    h = mx.random.normal((1, T, model.args.hidden_size)).astype(mx.bfloat16) * 0.1
    for part in ("attn", "mlp"):
        layer = getattr(block, part)
        layer_grad = nn.value_and_grad(layer, lambda m, h: m(h).astype(mx.float32).square().sum())
        timed(out, f"block_{part}_fwdbwd", lambda: layer_grad(layer, h))
    layer_parts(out, block.attn, h)
    head_grad = nn.value_and_grad(model, lambda m, h: loss_fn_head(m, h, y))
    timed(out, "loss_head_fwdbwd", lambda: head_grad(model, h))

    real = gdn_layer.gated_delta_rule
    gdn_layer.gated_delta_rule = lambda q, k, v, g, beta, **kw: (v, None)
    try:
        timed(out, "value_and_grad_without_op", lambda: grad(model, x, y, w))
        timed(out, "block_attn_fwdbwd_without_op", lambda: nn.value_and_grad(
            block.attn, lambda m, h: m(h).astype(mx.float32).square().sum())(block.attn, h))
    finally:
        gdn_layer.gated_delta_rule = real
    print(json.dumps(out))


def layer_parts(out, layer, h):
    """Forward + backward of the GDN layer's pieces around the op, each alone (input gradients)."""
    B, T, _ = h.shape
    q = layer.q_proj(h)
    v = layer.v_proj(h)
    o = mx.random.normal((B, T, layer.num_v_heads, layer.head_v_dim)).astype(h.dtype)
    parts = {
        "projections_qkvgab": lambda h: [p(h) for p in (layer.q_proj, layer.k_proj, layer.v_proj,
                                                         layer.g_proj, layer.a_proj, layer.b_proj)],
        "short_convs": lambda q, v: [layer.q_conv1d(q)[0], layer.k_conv1d(q)[0], layer.v_conv1d(v)[0]],
        "gated_norm_and_o_proj": lambda o, h: layer.o_proj(
            (layer.o_norm(o) * nn.silu(layer.g_proj(h).reshape(o.shape))).reshape(B, T, -1)),
    }
    heads = lambda x, n: x.reshape(B, T, n, -1)
    parts["gdn_op"] = lambda q, k, v, a, b: gdn_layer.gated_delta_rule(
        q, k, v, a, b, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=layer.A_log,
        dt_bias=layer.dt_bias, use_beta_sigmoid_in_kernel=True)[0]
    op_inputs = (heads(q, layer.num_heads), heads(layer.k_proj(h), layer.num_heads),
                 heads(v, layer.num_v_heads), layer.a_proj(h), layer.b_proj(h))
    inputs = {"projections_qkvgab": (h,), "short_convs": (q, v), "gated_norm_and_o_proj": (o, h),
              "gdn_op": op_inputs}
    for name, fn in parts.items():
        xs = inputs[name]
        loss = lambda *xs: sum(y.astype(mx.float32).square().sum() for y in _as_list(fn(*xs)))
        timed(out, f"layer_{name}_fwdbwd", lambda: mx.grad(loss, argnums=list(range(len(xs))))(*xs))


def _as_list(y):
    return y if isinstance(y, list) else [y]


def loss_fn_head(model, h, targets):
    """The final norm, the LM head and the cross-entropy (what follows the blocks)."""
    h = model.model.norm(h)
    logits = model.model.embeddings.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


if __name__ == "__main__":
    main()
