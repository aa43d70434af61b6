"""Convert fla (Hugging Face) and NVlabs (.pth) Gated DeltaNet checkpoints to mlx_gdn, and back.

    python convert.py --hf-path <hub id | dir> --mlx-path <out dir> [--dtype bfloat16] [-q --q-bits 4]
    python convert.py --hf-path iter-100000-ckpt.pth --mlx-path <out dir> \
        [--nvlabs-config GatedDeltaNet_H1_0.4B | config.json] [--tokenizer <tokenizer.model or dir>]
    python convert.py --to-hf --mlx-path <dir> --hf-path <out dir> [--dtype float32]
"""

import argparse
import sys

from mlx_gdn.convert import ConversionError, convert, to_hf


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", required=True, help="fla checkpoint: hub id or local directory "
                   "(with --to-hf: the output directory)")
    p.add_argument("--mlx-path", required=True, help="mlx_gdn directory (output, or input with --to-hf)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the weights' type (default: the checkpoint's, float32 with --to-hf; A_log and "
                        "dt_bias stay float32)")
    p.add_argument("-q", "--quantize", action="store_true",
                   help="quantize the linear and embedding layers whose width splits into groups")
    p.add_argument("--q-bits", type=int, default=4, choices=[4, 8],
                   help="bits a weight (default: %(default)s)")
    p.add_argument("--q-group-size", type=int, default=64,
                   help="weights sharing a scale and bias (default: %(default)s)")
    p.add_argument("--to-hf", action="store_true", help="export an mlx_gdn directory for fla / PyTorch")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--nvlabs-config", default=None, help="for a .pth: GatedDeltaNet_0.4B, _1.3B, "
                   "_H1_0.4B, _H1_1.3B or a config.json of ours (default: inferred from the weights)")
    p.add_argument("--tokenizer", default=None, help="for a .pth: tokenizer file or directory to carry")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        if args.to_hf:
            out = to_hf(args.mlx_path, args.hf_path, dtype=args.dtype or "float32", force=args.force)
        else:
            out = convert(args.hf_path, args.mlx_path, dtype=args.dtype, quantize=args.quantize,
                          q_bits=args.q_bits, q_group_size=args.q_group_size, force=args.force,
                          nvlabs_config=args.nvlabs_config, tokenizer=args.tokenizer)
    except (ConversionError, FileNotFoundError) as err:
        print(f"convert.py: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
