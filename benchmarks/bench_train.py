"""Training speed and memory: one optimizer step (forward + backward + AdamW) of a whole model.

    python benchmarks/bench_train.py --preset tiny-gdn --seq-lens 512 2048 --builtin   # this CPU
    python benchmarks/bench_train.py --preset gdn-0.4b --dtype bfloat16 --seq-lens 2048 8192 \\
        --checkpoint both                                                            # a GPU

--builtin times the same model with its GDN op replaced by MLX's `mx.fast.gated_delta_update`
through autodiff (gates, beta and the q/k norm computed the same way around it), in the same run.
--checkpoint both also measures each length with gradient checkpointing (peak memory). Each step is
taken as train.py takes it for rows without document boundaries: compiled (train.compiled_value_and_grad)
unless checkpointed or --no-compile; the built-in's step op by op (compiled, it ran 2x slower here).
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

import mlx_gdn.layers.gated_deltanet as gdn_layer
from mlx_gdn.models import Model, ModelArgs, PRESETS
from mlx_gdn.ops import gated_delta
from mlx_gdn.train import compiled_update, value_and_grad_step

OURS = gdn_layer.gated_delta_rule


def builtin_rule(q, k, v, a, b, *, A_log, dt_bias, allow_neg_eigval, **_):
    """The layer's call of gated_delta_rule, computed by mx.fast.gated_delta_update (no cache)."""
    q = gated_delta.l2_normalize(q.astype(mx.float32)) * q.shape[-1] ** -0.5
    k = gated_delta.l2_normalize(k.astype(mx.float32))
    gamma = mx.exp(gated_delta.gate_from_parameters(a.astype(mx.float32), A_log, dt_bias))
    beta = mx.sigmoid(b.astype(mx.float32)) * (2.0 if allow_neg_eigval else 1.0)
    dtype = v.dtype
    o, _ = mx.fast.gated_delta_update(q.astype(dtype), k.astype(dtype), v, gamma.astype(dtype),
                                      beta.astype(dtype))
    return o, None


def step_stats(model, seq_len, repeats, compiled=True):
    ids = mx.array(np.random.default_rng(0).integers(0, model.args.vocab_size, (1, seq_len + 1)))
    args = (ids[:, :-1], ids[:, 1:], mx.ones((1, seq_len)))
    optimizer = optim.AdamW(1e-4)
    optimizer.init(model.trainable_parameters())
    update = compiled_update(model, optimizer, grad_clip=0.0)  # as train.py, without clipping (as fla's)
    value_and_grad = value_and_grad_step(model, compiled)  # compiled: as train.py for unpacked rows

    def step():
        loss, grads = value_and_grad(*args)
        mx.eval(loss, grads)  # as train.py
        update(grads)
        mx.eval(model.parameters(), optimizer.state)

    step()  # warm-up
    mx.reset_peak_memory()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    seconds = (time.perf_counter() - start) / repeats
    return {"tok_s": seq_len / seconds, "step_s": seconds, "peak_gb": mx.get_peak_memory() / 1e9}


def guarded(fn):
    try:
        return fn()
    except Exception as err:  # out of memory: record it, go on
        return {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    finally:
        mx.clear_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-gdn")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--builtin", action="store_true")
    p.add_argument("--checkpoint", choices=["off", "on", "both"], default="off")
    p.add_argument("--no-compile", action="store_true", help="the step op by op (train.py --no-compile)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    mx.random.seed(0)
    model = Model(ModelArgs(**PRESETS[args.preset]))
    model.set_dtype(getattr(mx, args.dtype))
    print(f"mlx {mx.__version__}, {mx.default_device()}, {args.preset}, {args.dtype}", flush=True)
    rows = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpoint]
    for seq_len in args.seq_lens:
        for checkpoint in modes:
            model.model.grad_checkpoint = checkpoint
            compiled = not (args.no_compile or checkpoint)  # train.py's rule
            row = {"seq_len": seq_len, "grad_checkpoint": checkpoint,
                   "ours": guarded(lambda: step_stats(model, seq_len, args.repeats, compiled))}
            if args.builtin:
                # op by op: its faster way here (tiny-gdn, 2048 tokens, this CPU with OpenBLAS:
                # 2.3-2.8 s a step against 4.8-5.1 s compiled, tenth session)
                gdn_layer.gated_delta_rule = builtin_rule
                try:
                    row["builtin"] = guarded(lambda: step_stats(model, seq_len, 1, False))
                finally:
                    gdn_layer.gated_delta_rule = OURS
                if "tok_s" in row["builtin"] and "tok_s" in row["ours"]:
                    row["speedup"] = row["ours"]["tok_s"] / row["builtin"]["tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(mx.default_device()), "preset": args.preset, "dtype": args.dtype,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
