"""Generate text with a Gated DeltaNet model (mlx-lm's flags where they exist).

    python generate.py --prompt "A list comprehension"            # the embedded default model
    python generate.py --model <converted dir or hub id> --prompt "Once upon a time" --max-tokens 100
"""

import argparse
import sys

import mlx.core as mx

import mlx_gdn
from mlx_gdn.generate import DEFAULT_MODEL, stream_generate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="converted model directory or hub id (default: the embedded model)")
    p.add_argument("--prompt", required=True, help="the prompt, or - to read it from stdin")
    p.add_argument("--max-tokens", "-m", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--verbose", action="store_true", help="prompt/generation tokens per second, memory")
    args = p.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.seed is not None:
        mx.random.seed(args.seed)
    try:
        model, tokenizer = mlx_gdn.load(args.model)
        if tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer.model or tokenizer.json next to the weights")
        last = None
        for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                    temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                    stop=tuple(args.stop)):
            print(last.text, end="", flush=True)
        print()
    except (ValueError, FileNotFoundError) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 1
    if args.verbose and last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
              f"peak memory: {last.peak_memory_gb:.3f} GB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
