"""Whole models on the GPU, side by side with fla (run on the device machine: MLX CUDA + fla 0.6.0).

For random bf16 presets: prefill tokens/s (B = 1), time to first token and generation tokens/s at
B = 1 (ours: mlx_gdn.generate.generate_tokens; fla: transformers' generate, greedy, its cache), a
training step's tokens/s (forward + backward + AdamW; ours through the chunked VJP, fla through its
Triton kernels), and the weight-bandwidth roofline for generation (weights read once per token).
fla's attention layers need flash-attn (not installable there): hybrids run on our side only, or on
fla's with `--fla-attention sdpa`, a PyTorch SDPA stand-in for flash-attn (sdpa_attention.py).

    PYTHONPATH=. python benchmarks/bench_model_gpu.py --presets gdn-0.4b gdn-1.3b h1-0.4b --out r.json
"""

import argparse
import json
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from bench_gpu import random_model
from mlx_gdn.convert import fla_config
from mlx_gdn.generate import generate_tokens
from mlx_gdn.models import ModelArgs, PRESETS
from mlx_gdn.train import compiled_update, set_keep_chunk_pieces, value_and_grad_step

HBM_BYTES_S = 3.35e12  # H100 SXM


def seconds(fn, repeats=3):
    fn()  # warm-up (compilation, autotuning)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_ours(name, args, ids):
    model = random_model(name)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    row = {"params_M": params / 1e6, "roofline_tok_s": HBM_BYTES_S / (2 * params)}
    prompt = mx.array(ids)
    if "prefill" in args.parts:
        row["prefill_tok_s"] = ids.shape[1] / seconds(lambda: mx.eval(model(prompt)))
    short = mx.repeat(prompt[:, :args.prompt], args.gen_batch, axis=0)

    def first_token():
        mx.eval(next(generate_tokens(model, short, 1)))

    def generation():
        for _ in generate_tokens(model, short, args.new_tokens):
            pass

    if "gen" in args.parts:
        row["ttft_ms"] = seconds(first_token) * 1e3
        row["gen_tok_s"] = args.gen_batch * args.new_tokens / (seconds(generation, repeats=1)
                                                               - row["ttft_ms"] / 1e3)
    if "train" not in args.parts:
        return row

    x, y = prompt[:, :-1], prompt[:, 1:]
    optimizer = optim.AdamW(1e-4)
    optimizer.init(model.trainable_parameters())
    update = compiled_update(model, optimizer, grad_clip=0.0)  # as train.py, without clipping (as fla's)
    set_keep_chunk_pieces(model, args.keep_chunk_pieces)
    step = value_and_grad_step(model, not args.no_compile)  # compiled: as train.py for unpacked rows

    def train_step():
        loss, grads = step(x, y, mx.ones(y.shape))
        mx.eval(loss, grads)  # as train.py
        update(grads)
        mx.eval(model.parameters(), optimizer.state)

    mx.reset_peak_memory()
    row["train_tok_s"] = x.shape[1] / seconds(train_step)
    row["train_peak_gb"] = mx.get_peak_memory() / 1e9
    return row


def bench_fla(name, args, ids, row):
    """Fills row as it goes, so a failure late (the backward) keeps the numbers before it."""
    import fla.ops.common.chunk_o as chunk_o
    import torch
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: fla refuses its gated backward on this Triton

    config = fla_config(ModelArgs(**PRESETS[name]))
    if config.get("attn"):
        if args.fla_attention != "sdpa":
            row["skipped"] = "fla's attention layers need flash-attn"
            return
        import fla.layers.attn
        from sdpa_attention import flash_attn_func

        fla.layers.attn.flash_attn_func = flash_attn_func
        row["attention"] = "sdpa stand-in for flash-attn"
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**config)).cuda().to(torch.bfloat16)
    prompt = torch.tensor(ids, device="cuda")

    def run(fn):
        def timed():
            fn()
            torch.cuda.synchronize()
        return timed

    model.eval()
    with torch.no_grad():
        if "prefill" in args.parts:
            row["prefill_tok_s"] = ids.shape[1] / seconds(run(lambda: model(prompt, use_cache=False)))
            print(json.dumps(row), flush=True)
        short = prompt[:, :args.prompt].repeat(args.gen_batch, 1)
        gen = lambda n: model.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if "gen" in args.parts:
            row["ttft_ms"] = seconds(run(lambda: gen(1))) * 1e3
            row["gen_tok_s"] = args.gen_batch * args.new_tokens / (
                seconds(run(lambda: gen(args.new_tokens)), repeats=1) - row["ttft_ms"] / 1e3)
            print(json.dumps(row), flush=True)
    if "train" not in args.parts:
        return
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        loss = model(prompt[:, :-1], labels=prompt[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    torch.cuda.reset_peak_memory_stats()
    row["train_tok_s"] = (ids.shape[1] - 1) / seconds(run(train_step))
    row["train_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9


def keep_best(row, side, measured):
    """row[side] holds each measure's best round (most tokens/s, least time to first token; other
    values, such as peak memory, from the last round); row[side + "_rounds"] holds every round."""
    row.setdefault(f"{side}_rounds", []).append(measured)
    best = row.setdefault(side, {})
    for key, value in measured.items():
        if key.endswith("tok_s") and isinstance(best.get(key), float):
            best[key] = max(best[key], value)
        elif key == "ttft_ms" and isinstance(best.get(key), float):
            best[key] = min(best[key], value)
        else:
            best[key] = value


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["gdn-0.4b", "gdn-1.3b", "h1-0.4b"])
    p.add_argument("--seq-len", type=int, default=2048, help="prefill and training length")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens for generation")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--gen-batch", type=int, default=1, help="rows generated together (tokens/s counts all)")
    p.add_argument("--parts", nargs="+", choices=["prefill", "gen", "train"], default=["prefill", "gen", "train"])
    p.add_argument("--rounds", type=int, default=1,
                   help="times ours and fla are measured in turn (fla's numbers moved 30-40%% between calls)")
    p.add_argument("--no-compile", action="store_true", help="our training step op by op")
    p.add_argument("--keep-chunk-pieces", action="store_true",
                   help="our training step as train.py --keep-chunk-pieces runs it")
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--fla-attention", choices=["flash-attn", "sdpa"], default="flash-attn",
                   help="sdpa: fla's attention layers on a PyTorch SDPA stand-in (no flash-attn needed)")
    p.add_argument("--no-ours", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    print(f"mlx {mx.__version__}, device {mx.default_device()}", flush=True)
    rows = []
    for name in args.presets:
        vocab = PRESETS[name].get("vocab_size", 32000)
        ids = np.random.default_rng(0).integers(0, vocab, (1, args.seq_len + 1))
        row = {"preset": name, "seq_len": args.seq_len, "gen_batch": args.gen_batch}
        # ours and fla take turns, --rounds times; each side keeps its best round, and all rounds
        for _ in range(args.rounds):
            if not args.no_ours:
                keep_best(row, "ours", bench_ours(name, args, ids))
                print(json.dumps(row), flush=True)
            if not args.no_fla:
                fla = {}
                try:
                    bench_fla(name, args, ids, fla)
                except Exception as err:  # record why, keep the other presets
                    fla["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                keep_best(row, "fla", fla)
                print(json.dumps(row), flush=True)
        rows.append(row)
        mx.clear_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(mx.default_device()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
