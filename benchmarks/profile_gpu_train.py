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
from bench_gpu import time_mlx
from mlx_gdn.models import Model, ModelArgs, PRESETS
from mlx_gdn.train import compiled_update, loss_fn


def timed(out, name, fn, repeats=3):
    mx.reset_peak_memory()
    out[f"{name}_ms"] = round(time_mlx(fn, repeats=repeats, warmup=1), 2)
    out[f"{name}_peak_gb"] = round(mx.get_peak_memory() / 1e9, 2)
    print(json.dumps({name: out[f"{name}_ms"], "peak_gb": out[f"{name}_peak_gb"]}), flush=True)


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "gdn-0.4b"
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    mx.random.seed(0)
    model = Model(ModelArgs(**PRESETS[name]))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    ids = mx.random.randint(0, model.args.vocab_size, (1, T + 1))
    x, y, w = ids[:, :-1], ids[:, 1:], mx.ones((1, T))
    grad = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(1e-4)
    opt.init(model.trainable_parameters())
    update = compiled_update(model, opt, grad_clip=0.0)

    def step():
        loss, grads = grad(model, x, y, w)
        update(grads)
        return loss, model.parameters(), opt.state

    out = {"preset": name, "T": T}
    timed(out, "step", step)
    timed(out, "forward", lambda: model(x))
    timed(out, "forward_loss", lambda: loss_fn(model, x, y, w))
    timed(out, "value_and_grad", lambda: grad(model, x, y, w))
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


def loss_fn_head(model, h, targets):
    """The final norm, the LM head and the cross-entropy (what follows the blocks)."""
    h = model.model.norm(h)
    logits = model.model.embeddings.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


if __name__ == "__main__":
    main()
