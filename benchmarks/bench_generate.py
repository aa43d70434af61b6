"""Generation speed: time to first token and generation tokens/s at B = 1, for the embedded model and
random presets, through mlx_gdn.generate.generate_tokens (chunked prefill, then the decode step).

    python benchmarks/bench_generate.py --models default gdn-1.3b h1-1.3b --dtype bfloat16 \\
        --prompt-tokens 32 --new-tokens 8
(On a GPU with fla, benchmarks/bench_model_gpu.py compares against fla + transformers.)
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_gdn
from mlx_gdn.generate import DEFAULT_MODEL, generate_tokens
from mlx_gdn.models import Model, ModelArgs, PRESETS


def bench(model, prompt_tokens, new_tokens):
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, model.args.vocab_size, (1, prompt_tokens)))
    mx.eval(next(generate_tokens(model, prompt[:, :8], 1)))  # warm-up
    start = time.perf_counter()
    steps = generate_tokens(model, prompt, new_tokens)
    next(steps)
    ttft = time.perf_counter() - start
    for _ in steps:
        pass
    total = time.perf_counter() - start
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {"params_M": params / 1e6, "prompt_tokens": prompt_tokens, "ttft_s": ttft,
            "prompt_tok_s": prompt_tokens / ttft,
            "gen_tok_s": (new_tokens - 1) / (total - ttft) if new_tokens > 1 else None}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["default"], help="'default' or preset names")
    p.add_argument("--dtype", default="bfloat16", help="for the presets")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    print(f"mlx {mx.__version__}, {mx.default_device()}", flush=True)
    rows = []
    for name in args.models:
        if name == "default":
            model, _ = mlx_gdn.load(DEFAULT_MODEL)
        else:
            mx.random.seed(0)
            model = Model(ModelArgs(**PRESETS[name]))
            model.set_dtype(getattr(mx, args.dtype))
            mx.eval(model.parameters())
        row = {"model": name, **bench(model, args.prompt_tokens, args.new_tokens)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(mx.default_device()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
