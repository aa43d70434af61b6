"""Conversion time and peak RSS for a random fla-format checkpoint (bf16, sharded safetensors).

    python benchmarks/bench_convert.py --preset gdn-1.3b --shards 2 --workdir /tmp/bench_convert
Makes the checkpoint (fla's key names and config, as save_pretrained would), then times
`python convert.py` in a child process and reads its peak RSS (ru_maxrss).
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).parent.parent


def make_checkpoint(preset, shards, out: Path):
    from mlx_gdn.convert import fla_config
    from mlx_gdn.models import Model, ModelArgs, PRESETS
    args = ModelArgs(**PRESETS[preset])
    params = tree_flatten(Model(args).parameters())
    out.mkdir(parents=True, exist_ok=True)
    sizes = [v.size for _, v in params]
    per_shard = sum(sizes) / shards
    groups, current, total = [[]], 0, 0
    for name, value in params:
        if current >= per_shard and len(groups) < shards:
            groups.append([])
            current = 0
        groups[-1].append(name)
        current += value.size
    weight_map = {}
    values = dict(params)
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: mx.random.normal(values[n].shape, dtype=mx.bfloat16) * 0.02 for n in names}
        mx.save_safetensors(str(out / file), tensors, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(dict(fla_config(args), dtype="bfloat16")))
    largest = max((out / f).stat().st_size for f in set(weight_map.values()))
    return total, largest


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gdn-1.3b")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/bench_convert")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    total, largest = make_checkpoint(args.preset, args.shards, work / "fla")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "convert.py"), "--hf-path", str(work / "fla"),
                    "--mlx-path", str(work / "mlx")], check=True)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # KB on Linux
    row = {"preset": args.preset, "checkpoint_gb": total / 1e9, "shards": args.shards,
           "largest_shard_gb": largest / 1e9, "seconds": seconds, "peak_rss_gb": peak_gb,
           "target_gb": 1.3 * largest / 1e9 + 1}
    print(json.dumps(row))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
