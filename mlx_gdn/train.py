"""Training (first step): full fine-tuning or training from a preset, on {"text"} JSONL or plain text.

AdamW with linear warmup + cosine decay (no weight decay on A_log, dt_bias, D and norms, as fla),
gradient clipping, atomic checkpoints that resume exactly (weights, optimizer, schedule position,
data order), JSONL logs and a loss-curve PNG, a tqdm bar. Batches are windows of seq_len + 1 tokens
over the documents joined by EOS, in a seeded order.
"""

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from .loading import load_tokenizer, resolve
from .models import PRESETS, Model, ModelArgs, load_model, save_model


@dataclass
class TrainConfig:
    model: str
    data: str
    out: str
    tokenizer: Optional[str] = None  # for a preset: a tokenizer.model / tokenizer.json file
    seq_len: int = 256
    batch_size: int = 8
    iters: int = 100
    lr: float = 1e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 50
    eval_every: int = 50
    resume: bool = False


class DataError(ValueError):
    """Bad training data: names the file (and line)."""


def read_texts(path: Path):
    if path.suffix == ".txt":
        texts = [path.read_text()]
    else:
        texts = []
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict) or set(row) != {"text"}:
                    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{path}:{number}: expected a row {{\"text\": ...}}, got {fields}")
                texts.append(row["text"])
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path}: no text")
    return texts


def token_stream(texts, tokenizer):
    ids = []
    for text in texts:
        ids += tokenizer.encode(text)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return np.array(ids, dtype=np.int32)


def data_files(data: Path):
    if data.is_file():
        return data, None
    train, valid = data / "train.jsonl", data / "valid.jsonl"
    if not train.is_file():
        raise DataError(f"{data}: neither a .txt/.jsonl file nor a directory with train.jsonl")
    return train, (valid if valid.is_file() else None)


def windows(tokens, seq_len):
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(f"the data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return n


def batch_at(tokens, order, step, batch_size, seq_len):
    """The step-th batch: windows order[step * batch_size ...] (wrapping), as (inputs, targets)."""
    idx = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
    rows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in idx])
    return mx.array(rows[:, :-1]), mx.array(rows[:, 1:])


def loss_fn(model, inputs, targets):
    logits = model(inputs)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


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


def build_model(cfg: TrainConfig):
    if cfg.model in PRESETS:
        if not cfg.tokenizer:
            raise ValueError(f"training preset {cfg.model!r} from scratch needs --tokenizer")
        mx.random.seed(cfg.seed)
        model = Model(ModelArgs(**PRESETS[cfg.model]))
        tok_dir = Path(cfg.tokenizer).parent
        name = Path(cfg.tokenizer).name
        if name not in ("tokenizer.model", "tokenizer.json"):
            tmp = Path(tempfile.mkdtemp())
            shutil.copy(cfg.tokenizer, tmp / ("tokenizer.json" if name.endswith(".json") else "tokenizer.model"))
            tok_dir = tmp
        return model, load_tokenizer(tok_dir), [f for f in tok_dir.iterdir() if f.name.startswith("tokenizer")]
    path = resolve(cfg.model)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer next to the model")
    return load_model(path), tokenizer, [f for f in path.iterdir() if f.name.startswith(("tokenizer", "special"))]


def train(cfg: TrainConfig, progress=True):
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, tokenizer_files = build_model(cfg)
    train_file, valid_file = data_files(Path(cfg.data))
    tokens = token_stream(read_texts(train_file), tokenizer)
    valid = token_stream(read_texts(valid_file), tokenizer) if valid_file else None
    n_windows = windows(tokens, cfg.seq_len)
    if model.args.vocab_size <= int(tokens.max()):
        raise DataError(f"token id {int(tokens.max())} is outside the model's vocabulary "
                        f"({model.args.vocab_size})")
    optimizer = make_optimizer(cfg)
    step = 0
    if cfg.resume and (out / "checkpoint").exists():
        ck = out / "checkpoint"
        model = load_model(ck / "model")
        optimizer.init(model.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
        step = json.loads((ck / "state.json").read_text())["step"]
        if (out / "log.jsonl").exists():  # drop what the interrupted run logged past its checkpoint
            rows = [r for r in open(out / "log.jsonl") if json.loads(r)["step"] <= step]
            (out / "log.jsonl").write_text("".join(rows))
    order = np.random.default_rng(cfg.seed).permutation(n_windows)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=cfg.iters, initial=step, disable=not progress, desc="train")
    last_good = step
    try:
        while step < cfg.iters:
            inputs, targets = batch_at(tokens, order, step, cfg.batch_size, cfg.seq_len)
            loss, grads = value_and_grad(model, inputs, targets)
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state, loss)
            step += 1
            loss = loss.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; the last good checkpoint "
                                         f"(step {last_good}) is in {out / 'checkpoint'}")
            record = {"step": step, "loss": loss, "lr": float(optimizer.optimizers[0].learning_rate)}
            if valid is not None and (step % cfg.eval_every == 0 or step == cfg.iters):
                vin, vtg = batch_at(valid, np.arange(windows(valid, cfg.seq_len)), 0,
                                    cfg.batch_size, cfg.seq_len)
                record["valid_loss"] = loss_fn(model, vin, vtg).item()
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}")
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.iters:
                save_checkpoint(out, model, optimizer, {"step": step, "config": asdict(cfg)})
                last_good = step
    finally:
        bar.close()
        log.close()
    save_model(model, out / "model", extra_files=tokenizer_files)
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
