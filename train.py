"""Train or fine-tune a Gated DeltaNet model: full fine-tuning, LoRA, or a preset from scratch.

    python train.py --model tiny-gdn --tokenizer tok/tokenizer.model --data corpus.txt --out runs/tiny
    python train.py --model <converted dir> --data <dir with train.jsonl> --out runs/ft --resume
    python train.py --model <dir> --data chats/ --out runs/lora --lora-rank 8 --fuse --dtype bfloat16
Rows: {"text"}, {"prompt", "completion"} or {"messages"} (the model's chat template).
"""

import argparse
import dataclasses
import sys

from mlx_gdn.train import DataError, TrainConfig, train


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(TrainConfig):  # the flags, their defaults and help: TrainConfig's
        flag, help = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if field.type is bool or field.type == "bool":
            p.add_argument(flag, action="store_true", help=help)
        elif field.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=help)
        else:
            kind = type(field.default) if field.default is not None else str
            shown = "" if field.default is None else " (default: %(default)s)"
            p.add_argument(flag, type=kind, default=field.default, help=help + shown)
    return p


def main(argv=None):
    cfg = TrainConfig(**vars(parser().parse_args(argv)))
    try:
        train(cfg)
    except (DataError, ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {cfg.out}/model, {cfg.out}/log.jsonl, {cfg.out}/loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
