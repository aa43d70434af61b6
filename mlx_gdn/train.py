"""Training: full fine-tuning, LoRA, or training a preset from scratch (see mlx_gdn.data for rows).

AdamW with linear warmup + cosine decay (no weight decay on A_log, dt_bias, D and norms, as fla),
gradient clipping and accumulation, optional gradient checkpointing and bf16 weights (the op keeps
float32 states), atomic checkpoints that resume exactly (weights, optimizer, schedule position,
data order), JSONL logs and a loss-curve PNG, a tqdm bar. Batches are packed rows in a seeded order;
documents in a row never see each other.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from tqdm import tqdm

from .data import DataError, batch_at, data_files, load_packed
from .loading import load_tokenizer, resolve
from .lora import DEFAULT_KEYS, LoraConfig, apply_lora, fuse
from .layers.gated_deltanet import GatedDeltaNet
from .models import PRESETS, Model, ModelArgs, load_model, save_model


def _flag(default, help):
    """A TrainConfig field: its default and the help train.py's flag shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = _flag(dataclasses.MISSING, f"a converted model directory or hub id, or a preset to "
                                            f"train from scratch ({', '.join(PRESETS)})")
    data: str = _flag(dataclasses.MISSING, "a .txt or .jsonl file, or a directory with train.jsonl "
                                           "(and valid.jsonl for a validation loss)")
    out: str = _flag(dataclasses.MISSING, "run directory: model/, checkpoint/, log.jsonl, loss.png")
    tokenizer: Optional[str] = _flag(None, "for a preset: a tokenizer.model or tokenizer.json file")
    seq_len: int = _flag(256, "tokens a row (documents packed into rows; they never see each other)")
    batch_size: int = _flag(8, "rows a micro-batch")
    iters: int = _flag(100, "optimizer steps (unless --epochs)")
    lr: float = _flag(1e-3, "peak learning rate (AdamW)")
    warmup: int = _flag(10, "steps of linear warmup, then cosine decay")
    min_lr_ratio: float = _flag(0.1, "the cosine decay's final learning rate, a fraction of --lr")
    weight_decay: float = _flag(0.01, "AdamW's (none on A_log, dt_bias, D and norms, as fla)")
    grad_clip: float = _flag(1.0, "clip the gradients' global norm to this (0: no clipping)")
    seed: int = _flag(0, "data order, a preset's initial weights, LoRA's initial adapters")
    save_every: int = _flag(50, "steps between checkpoints (written atomically; the last step always)")
    eval_every: int = _flag(50, "steps between validation losses (with valid.jsonl)")
    resume: bool = _flag(False, "continue from OUT/checkpoint exactly where it stopped")
    epochs: int = _flag(0, "> 0: train this many passes over the rows (overrides --iters)")
    grad_accum: int = _flag(1, "micro-batches of --batch-size rows per optimizer step")
    grad_checkpoint: bool = _flag(False, "recompute each block's activations in the backward: less memory")
    dtype: str = _flag("float32", "float32 or bfloat16 (weights and activations; A_log / dt_bias and "
                                  "the op's states stay float32)")
    lora_rank: int = _flag(0, "> 0: LoRA adapters of this rank instead of full fine-tuning")
    lora_alpha: float = _flag(16.0, "LoRA scale numerator (scale = alpha / rank)")
    lora_layers: int = _flag(-1, "LoRA adapters in the last N blocks (-1: all)")
    lora_keys: str = _flag(",".join(DEFAULT_KEYS), "the linear layers that get adapters, comma-separated")
    fuse: bool = _flag(False, "LoRA: write the model with the adapters merged into the weights")
    no_compile: bool = _flag(False, "run every step op by op (no mx.compile; slower, for debugging)")
    # the Gated DeltaNet op keeps its per-chunk pieces for the backward: faster, more memory (H100 /
    # gdn-0.4b at 8192 tokens: see benchmarks/RESULTS.md, twelfth session)
    keep_chunk_pieces: bool = _flag(False, "the op keeps its chunk pieces for the backward: faster on a "
                                           "GPU, more memory")


# The loss runs over blocks of about this many logits, each block's logits made again in the
# backward: the [B, T, vocab] logits, their float32 copy and their gradient need not exist whole
# (gdn-0.4b at 8192 tokens: 1 GB each), for one more LM-head product in the backward. None: by device.
# This CPU, tiny-gdn with a 32000 vocabulary at 4096 tokens, 2^22 (16 MB): peak 2.2 GB -> 0.74 GB,
# step 6.4 -> 4.8 s (2^24: 1.26 GB; MLX's scheduler keeps several blocks alive at once). H100,
# gdn-0.4b at 8192 tokens: 2^22 31.2k tokens/s (28.9 GB), 2^26 35.5k (31.4 GB): GPUs want fewer,
# larger products.
LOSS_BLOCK_LOGITS = None
CPU_LOSS_BLOCK_LOGITS, GPU_LOSS_BLOCK_LOGITS = 1 << 22, 1 << 26


def _loss_block_logits():
    if LOSS_BLOCK_LOGITS is not None:
        return LOSS_BLOCK_LOGITS
    return GPU_LOSS_BLOCK_LOGITS if mx.default_device().type == mx.gpu else CPU_LOSS_BLOCK_LOGITS


def loss_fn(model, inputs, targets, weights, segments=None):
    """Mean cross-entropy over the weighted targets."""
    h = model.hidden(inputs, segments=segments)
    B, T = targets.shape
    block = max(1, _loss_block_logits() // (B * model.args.vocab_size))
    if block >= T:
        total = _weighted_ce(model.head(h), targets, weights)
    else:
        total = sum(_recomputed_ce(model, h[:, s:s + block], targets[:, s:s + block],
                                   weights[:, s:s + block]) for s in range(0, T, block))
    return total / mx.maximum(weights.sum(), 1.0)


def _weighted_ce(logits, targets, weights, keep_softmax=True):
    ce = cross_entropy if keep_softmax else partial(nn.losses.cross_entropy, reduction="none")
    return (ce(logits.astype(mx.float32), targets) * weights).sum()


def cross_entropy(logits, targets):
    """nn.losses.cross_entropy(logits, targets, reduction="none") with one pass of exp over the
    logits, not two: the forward keeps the softmax for the backward, where autodiff of logsumexp
    would form it again (MLX's CPU exp costs ~12 ns an element: tiny-gdn's 2048 x 512 logits,
    ~12 ms a step). Only for a loss taken whole: the kept softmax outlives a loss block's
    recomputation (a block's outputs stay alive together), so blocked losses would hold every block's
    softmax at once (this CPU, 4096 tokens x 32000: peak 776 -> 1231 MB op by op)."""
    return _cross_entropy_and_softmax(logits, targets)[0]


@mx.custom_function
def _cross_entropy_and_softmax(logits, targets):
    top = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    e = mx.exp(logits - top)
    total = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (top + mx.log(total) - picked)[..., 0], e / total


@_cross_entropy_and_softmax.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    return (outputs[1] - onehot) * cotangents[0][..., None], mx.zeros_like(targets)


def _recomputed_ce(model, h, targets, weights):
    """_weighted_ce of one block of hidden states, its logits recomputed in the backward."""
    module = model.head_module()

    def inner(params, h):
        module.update(params)
        return _weighted_ce(model.head(h), targets, weights, keep_softmax=False)

    return mx.checkpoint(inner)(module.trainable_parameters(), h)


def compiled_value_and_grad(model):
    """(loss, grads) = step(inputs, targets, weights): loss_fn's value and gradients under mx.compile,
    for rows without document boundaries (the graph is traced once per input shape and replayed, so
    it cannot follow a per-batch document layout). MLX compiles nothing inside a transformation:
    under value_and_grad, chunk.fused's chains run op by op; compiled whole, the forward's and the
    backward's element-wise chains fuse and no Python runs per step. Settings read while tracing
    (block sizes, the kernel backend) are those of the first call."""
    value_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=[model.state])
    def step(inputs, targets, weights):
        params = model.trainable_parameters()
        loss, grads = value_and_grad(model, inputs, targets, weights)
        model.update(params)  # value_and_grad leaves its traced copies in the model: put back ours
        return loss, grads

    return step


def value_and_grad_step(model, compiled):
    """step(inputs, targets, weights[, segments]) -> (loss, grads): compiled_value_and_grad(model)
    (rows without document boundaries), or loss_fn's value_and_grad op by op."""
    return compiled_value_and_grad(model) if compiled else partial(nn.value_and_grad(model, loss_fn), model)


def compiled_update(model, optimizer, grad_clip):
    """update(grads): gradient clipping and the optimizer step over every parameter as one compiled
    graph (op by op, AdamW over gdn-0.4b's 517 M parameters took 27 ms on an H100). The optimizer's
    state must exist (optimizer.init) before the first call."""
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads):
        if grad_clip:
            grads, _ = optim.clip_grad_norm(grads, grad_clip)
        optimizer.update(model, grads)

    return update


def no_decay(path, _):
    return path.endswith(("A_log", "dt_bias", ".D", "norm.weight"))


def make_optimizer(cfg: TrainConfig):
    warmup = optim.linear_schedule(0.0, cfg.lr, max(cfg.warmup, 1))
    decay = optim.cosine_decay(cfg.lr, max(cfg.iters - cfg.warmup, 1), cfg.lr * cfg.min_lr_ratio)
    schedule = optim.join_schedules([warmup, decay], [max(cfg.warmup, 1)])
    return optim.MultiOptimizer(
        [optim.AdamW(schedule, weight_decay=0.0), optim.AdamW(schedule, weight_decay=cfg.weight_decay)],
        [no_decay])


def save_checkpoint(out: Path, model, optimizer, state: dict):
    """out/checkpoint, replaced atomically: a failing write leaves the last good one."""
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=out))
    try:
        save_model(model, tmp / "model")
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "state.json").write_text(json.dumps(state))
        old = out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if (out / "checkpoint").exists():
            os.replace(out / "checkpoint", old)
        os.replace(tmp, out / "checkpoint")
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_model(cfg: TrainConfig, out: Path):
    """(model, tokenizer, tokenizer files to ship with the result)."""
    if cfg.model in PRESETS:
        if not cfg.tokenizer:
            raise ValueError(f"training preset {cfg.model!r} from scratch needs --tokenizer")
        source = Path(cfg.tokenizer)
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such tokenizer file")
        tok_dir = out / ".tokenizer"  # under its canonical name, where load_tokenizer looks
        tok_dir.mkdir(exist_ok=True)
        shutil.copy(source, tok_dir / ("tokenizer.json" if source.suffix == ".json" else "tokenizer.model"))
        return Model(ModelArgs(**PRESETS[cfg.model])), load_tokenizer(tok_dir), list(tok_dir.iterdir())
    path = resolve(cfg.model)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer next to the model")
    files = [f for f in path.iterdir() if f.name.startswith(("tokenizer", "special"))]
    return load_model(path), tokenizer, files


def prepare(model, cfg: TrainConfig):
    """The training-time form of the model: dtype, LoRA adapters, gradient checkpointing."""
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    if cfg.dtype == "bfloat16":
        keep = lambda path, _: path.endswith(("A_log", "dt_bias"))
        model.update(tree_unflatten([(k, v if keep(k, v) else v.astype(mx.bfloat16))
                                     for k, v in tree_flatten(model.parameters())]))
    if cfg.lora_rank and getattr(model, "lora", None) is None:
        keys = tuple(k.strip() for k in cfg.lora_keys.split(",") if k.strip())
        apply_lora(model, LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_layers, keys))
    model.model.grad_checkpoint = cfg.grad_checkpoint
    set_keep_chunk_pieces(model, cfg.keep_chunk_pieces)
    return model


def set_keep_chunk_pieces(model, keep):
    """The op's keep_chunk_pieces for every Gated DeltaNet layer of the model."""
    for layer in model.modules():
        if isinstance(layer, GatedDeltaNet):
            layer.keep_chunk_pieces = keep


def train(cfg: TrainConfig, progress=True):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.grad_accum < 1 or cfg.batch_size < 1:
        raise ValueError("--batch-size and --grad-accum must be at least 1")
    group = mx.distributed.init()  # started by mlx.launch: data parallel; else one process
    rank, size = group.rank(), group.size()
    if cfg.batch_size % size:
        raise ValueError(f"--batch-size ({cfg.batch_size}) must divide by the number of processes ({size})")
    writer = rank == 0  # logs, checkpoints and the model come from rank 0
    mx.random.seed(cfg.seed)  # the initial weights of a preset and of LoRA adapters
    model, tokenizer, tokenizer_files = build_model(cfg, out)
    train_file, valid_file = data_files(Path(cfg.data))
    rows = load_packed(train_file, tokenizer, cfg.seq_len)
    valid = load_packed(valid_file, tokenizer, cfg.seq_len) if valid_file else None
    if model.args.vocab_size <= int(rows.ids.max()):
        raise DataError(f"token id {int(rows.ids.max())} is outside the model's vocabulary "
                        f"({model.args.vocab_size})")
    per_step = cfg.batch_size * cfg.grad_accum
    iters = cfg.epochs * -(-len(rows) // per_step) if cfg.epochs > 0 else cfg.iters
    optimizer = make_optimizer(dataclasses.replace(cfg, iters=iters))
    step = 0
    if cfg.resume and (out / "checkpoint").exists():
        ck = out / "checkpoint"
        model = load_model(ck / "model")
        step = json.loads((ck / "state.json").read_text())["step"]
        prepare(model, cfg)
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
        if (out / "log.jsonl").exists():  # drop what the interrupted run logged past its checkpoint
            kept = [r for r in open(out / "log.jsonl") if json.loads(r)["step"] <= step]
            (out / "log.jsonl").write_text("".join(kept))
    else:
        prepare(model, cfg)
        optimizer.init(model.trainable_parameters())  # the compiled update reads and writes the state
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    value_and_grad, compiled_step = value_and_grad_step(model, False), value_and_grad_step(model, True)
    clip_and_update = compiled_update(model, optimizer, cfg.grad_clip)

    def loss_and_grads(inputs, targets, weights, docs):
        # compiled where no row holds a document boundary (the traced graph cannot follow a batch's
        # layout) and without checkpointing, the memory-saving mode (compiled, gdn-0.4b at 8192
        # tokens on an H100 peaked at 22.8 GB against 20.7; unchecked, 166 ms a step against 210)
        if cfg.no_compile or cfg.grad_checkpoint or not mx.all(docs == docs[:, :1]).item():
            return value_and_grad(inputs, targets, weights, docs)
        return compiled_step(inputs, targets, weights)

    def micro_batch(data, at, batch_order, share=True):
        return batch_at(data, batch_order, at, cfg.batch_size, *((rank, size) if share else (0, 1)))

    log = open(out / "log.jsonl", "a") if writer else open(os.devnull, "w")
    bar = tqdm(total=iters, initial=step, disable=not (progress and writer), desc="train")
    last_good, start, tokens = step, time.perf_counter(), 0
    try:
        while step < iters:
            # the loss is the mean over every weighted target of the step (all micro-batches, all
            # ranks): each part's mean and gradient count by its number of targets
            loss, grads, count = 0.0, None, 0.0
            for micro in range(cfg.grad_accum):
                batch = micro_batch(rows, step * cfg.grad_accum + micro, order)
                tokens += batch[0].size * size
                n = batch[2].sum()
                part, part_grads = loss_and_grads(*batch)
                loss, count = loss + part * n, count + n
                part_grads = tree_map(lambda g: g * n.astype(g.dtype), part_grads)
                grads = part_grads if grads is None else tree_map(mx.add, grads, part_grads)
            if size > 1:
                loss, count = mx.distributed.all_sum(loss), mx.distributed.all_sum(count)
            count = mx.maximum(count, 1.0)
            grads = tree_map(lambda g: g * (size / count).astype(g.dtype), nn.average_gradients(grads))
            loss = loss / count
            mx.eval(loss, grads)  # then the update: one graph for both ran 4% slower (H100)
            clip_and_update(grads)
            mx.eval(model.parameters(), optimizer.state)
            step += 1
            loss = loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; the last good checkpoint "
                                         f"(step {last_good}) is in {out / 'checkpoint'}")
            record = {"step": step, "loss": loss, "lr": float(optimizer.optimizers[0].learning_rate),
                      "tokens_per_s": tokens / (time.perf_counter() - start),
                      "peak_memory_gb": mx.get_peak_memory() / 1e9}
            if valid is not None and (step % cfg.eval_every == 0 or step == iters):
                batches = range(min(8, -(-len(valid) // cfg.batch_size)))
                record["valid_loss"] = float(np.mean([
                    loss_fn(model, *micro_batch(valid, i, np.arange(len(valid)), share=False)).item()
                    for i in batches]))
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                            lr=f"{record['lr']:.2e}", mem=f"{record['peak_memory_gb']:.2f}GB")
            bar.update(1)
            if writer and (step % cfg.save_every == 0 or step == iters):
                save_checkpoint(out, model, optimizer, {"step": step, "config": asdict(cfg)})
                last_good = step
    finally:
        bar.close()
        log.close()
    if cfg.fuse and getattr(model, "lora", None) is not None:
        fuse(model)
    if writer:
        save_model(model, out / "model", extra_files=tokenizer_files)
        shutil.rmtree(out / ".tokenizer", ignore_errors=True)
        plot_losses(out / "log.jsonl", out / "loss.png")
    return model


def plot_losses(log_file: Path, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(log_file)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    valid = [r for r in rows if "valid_loss" in r]
    if valid:
        ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
