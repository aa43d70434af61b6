"""Model speed and memory: prefill tokens/s, decode tokens/s (B = 1, 8), peak memory, and the decode
cache size as the context grows (it must stay flat: GDN/Mamba2 states are fixed, SWA keeps a window).

    python benchmarks/bench_model.py --presets tiny-gdn tiny-h1 --prefill 2048 8192 --contexts 1024 8192 32768
    python benchmarks/bench_model.py --presets gdn-0.4b --prefill 256 --contexts   # CPU-sized
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gdn.models import Model, ModelArgs, PRESETS


def cache_bytes(cache):
    total = 0
    for c in cache:
        for value in vars(c).values():
            for a in (value if isinstance(value, tuple) else (value,)):
                if isinstance(a, mx.array):
                    total += a.nbytes
    return total


def timed(fn):
    start = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, time.perf_counter() - start


def bench(name, args):
    mx.random.seed(0)
    model = Model(ModelArgs(**PRESETS[name]))
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    vocab = model.args.vocab_size
    rng = np.random.default_rng(0)
    row = {"preset": name, "params_M": sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6}
    for length in args.prefill:
        ids = mx.array(rng.integers(0, vocab, (1, length)))
        timed(lambda: model(ids))  # warm-up (kernel compilation)
        mx.reset_peak_memory()
        _, seconds = timed(lambda: model(ids))
        row[f"prefill_{length}_tok_s"] = length / seconds
        row[f"prefill_{length}_peak_gb"] = mx.get_peak_memory() / 1e9
    for B in (1, 8):
        cache = model.make_cache()
        logits, _ = timed(lambda: model(mx.array(rng.integers(0, vocab, (B, 16))), cache=cache))
        token = mx.argmax(logits[:, -1:], axis=-1)
        for _ in range(2):  # warm-up: the decode kernels compile on their first call
            token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
            mx.eval(token)
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
            mx.eval(token)
        row[f"decode_B{B}_tok_s"] = B * args.decode_steps / (time.perf_counter() - start)
    for ctx in args.contexts:
        cache = model.make_cache()
        for start in range(0, ctx, args.piece):  # prefill the context piece by piece through the cache
            mx.eval(model(mx.array(rng.integers(0, vocab, (1, min(args.piece, ctx - start)))), cache=cache))
        mx.reset_peak_memory()
        mx.eval(model(mx.array([[1]]), cache=cache))
        row[f"cache_MB_at_{ctx}"] = cache_bytes(cache) / 1e6
        row[f"decode_peak_GB_at_{ctx}"] = mx.get_peak_memory() / 1e9
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny-gdn", "tiny-h1"])
    p.add_argument("--prefill", type=int, nargs="+", default=[2048])
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--contexts", type=int, nargs="*", default=[1024, 8192, 32768])
    p.add_argument("--piece", type=int, default=2048)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, {args.dtype}")
    rows = []
    for name in args.presets:
        rows.append(bench(name, args))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(mx.default_device()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
