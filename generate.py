"""Generate text with a Gated DeltaNet model (mlx-lm's flags where they exist).

    python generate.py --prompt "A list comprehension"            # the embedded default model
    python generate.py --model <converted dir or hub id> --prompt "Once upon a time" --max-tokens 100
    python generate.py --model <dir> --system "Be brief." --prompt "What is a delta rule?"  # chat
    python generate.py --prompts-file prompts.txt                 # one prompt a line, one output a line
A model with a chat template (tokenizer_config.json) gets its prompt through it unless
--no-chat-template.
"""

import argparse
import sys

import mlx.core as mx

import mlx_gdn
from mlx_gdn.generate import DEFAULT_MODEL, chat_prompt, generate_batch, stream_generate


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="converted model directory or hub id (default: the embedded model)")
    p.add_argument("--prompt", help="the prompt, or - to read it from stdin")
    p.add_argument("--prompts-file", help="a file of prompts, one a line: generated as one batch "
                   "(left-padded), one output a line")
    p.add_argument("--system", default=None, help="a system prompt (through the chat template)")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as it is")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest prompt + generation (default: the config's max_position_embeddings)")
    p.add_argument("--max-tokens", "-m", type=int, default=100,
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.0,
                   help="nucleus sampling: the smallest set of tokens of this total probability (0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this fraction of the likeliest's probability (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalize tokens already in the prompt or generated, as mlx-lm does "
                        "(> 1 discourages repeats)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--verbose", action="store_true", help="prompt/generation tokens per second, memory")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.prompts_file is None):
        p.error("give --prompt or --prompts-file (one of them)")
    if args.seed is not None:
        mx.random.seed(args.seed)
    sampling = dict(temp=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p)
    last = None
    try:
        model, tokenizer = mlx_gdn.load(args.model)
        if tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer.model or tokenizer.json next to the weights")
        as_chat = lambda text: chat_prompt(tokenizer, text, args.system, not args.no_chat_template)
        if args.prompts_file:
            with open(args.prompts_file) as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
            if not prompts:
                raise ValueError(f"{args.prompts_file}: no prompts")
            outputs = generate_batch(model, tokenizer, [as_chat(x) for x in prompts],
                                     max_tokens=args.max_tokens, max_context=args.max_context, **sampling)
            for text in outputs:
                print(text.replace("\n", " "))
            return 0
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        for last in stream_generate(model, tokenizer, as_chat(prompt) if prompt else prompt,
                                    max_tokens=args.max_tokens,
                                    repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
                                    max_context=args.max_context, **sampling):
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
