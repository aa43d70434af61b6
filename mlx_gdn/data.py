"""Training data: JSONL rows (or a .txt) -> packed rows of seq_len + 1 tokens with loss weights and
document ids.

Rows: {"text"} (loss on every token), {"prompt", "completion"} (loss on the completion and its EOS),
{"messages": [{"role", "content"}, ...]} (the model's chat template; loss on the assistant turns).
Each example is cut into pieces of at most seq_len + 1 tokens, and the pieces are packed in order
into rows (a piece that does not fit starts the next row; the rest is padding with zero weight).
The model gets each token's document id (`segments`), so packed documents never see each other,
and a target whose input token belongs to another document carries no loss.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

ROW_KINDS = ({"text"}, {"prompt", "completion"}, {"messages"})


class DataError(ValueError):
    """Bad training data: names the file (and line)."""


def data_files(data: Path):
    """(train file, valid file or None) from a .txt/.jsonl file or a directory with train.jsonl."""
    if data.is_file():
        return data, None
    train, valid = data / "train.jsonl", data / "valid.jsonl"
    if not train.is_file():
        raise DataError(f"{data}: neither a .txt/.jsonl file nor a directory with train.jsonl")
    return train, (valid if valid.is_file() else None)


def read_rows(path: Path):
    """The rows of a JSONL file (each one of ROW_KINDS), or a .txt as one {"text"} row."""
    if path.suffix == ".txt":
        rows = [{"text": path.read_text()}]
    else:
        rows = []
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict) or set(row) not in ROW_KINDS:
                    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{path}:{number}: expected a row {{\"text\": ...}}, "
                                    f"{{\"prompt\", \"completion\"}} or {{\"messages\"}}, got {fields}")
                if "messages" in row and not (isinstance(row["messages"], list) and all(
                        isinstance(m, dict) and {"role", "content"} <= set(m) for m in row["messages"])):
                    raise DataError(f"{path}:{number}: messages must be a list of "
                                    "{\"role\", \"content\"} objects")
                rows.append(row)
    rows = [r for r in rows if "text" not in r or r["text"].strip()]
    if not rows:
        raise DataError(f"{path}: no text")
    return rows


def encode_row(row, tokenizer):
    """(ids, weights): weights[i] = 1 where token i is a target the loss counts."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in row:
        ids = tokenizer.encode(row["text"]) + eos
        return ids, [1.0] * len(ids)
    if "prompt" in row:
        prompt = tokenizer.encode(row["prompt"])
        completion = tokenizer.encode(row["completion"], add_bos=False) + eos
        return prompt + completion, [0.0] * len(prompt) + [1.0] * len(completion)
    ids, assistant = tokenizer.encode_chat(row["messages"])
    return ids, [float(a) for a in assistant]


@dataclass
class Packed:
    """Rows of seq_len + 1 tokens: ids, weights (float32) and document ids (int32), [n, seq_len + 1]."""
    ids: np.ndarray
    weights: np.ndarray
    docs: np.ndarray
    tokens: int  # real (not padding) tokens

    def __len__(self):
        return len(self.ids)


def pack(examples, seq_len: int, pad_id: int = 0) -> Packed:
    """Pieces of at most seq_len + 1 tokens packed in order into rows (see the module docstring)."""
    width = seq_len + 1
    rows, row, filled, doc = [], [], 0, 0
    for ids, weights in examples:
        for start in range(0, len(ids), width):
            piece = (ids[start:start + width], weights[start:start + width], doc)
            doc += 1
            if filled + len(piece[0]) > width:
                rows.append(row)
                row, filled = [], 0
            row.append(piece)
            filled += len(piece[0])
    if row:
        rows.append(row)
    out = Packed(np.full((len(rows), width), pad_id, np.int32), np.zeros((len(rows), width), np.float32),
                 np.zeros((len(rows), width), np.int32), 0)
    for r, pieces in enumerate(rows):
        at = 0
        for ids, weights, d in pieces:
            out.ids[r, at:at + len(ids)] = ids
            out.weights[r, at:at + len(ids)] = weights
            out.docs[r, at:at + len(ids)] = d
            at += len(ids)
        out.docs[r, at:] = doc + 1  # padding: a document of its own
        out.tokens += at
    return out


def load_packed(path: Path, tokenizer, seq_len: int) -> Packed:
    try:
        examples = [encode_row(r, tokenizer) for r in read_rows(path)]
    except DataError:
        raise
    except ValueError as err:  # a chat template that is missing or refuses the messages
        raise DataError(f"{path}: {err}") from None
    packed = pack(examples, seq_len, pad_id=tokenizer.eos_token_id or 0)
    if packed.tokens < seq_len + 1:
        raise DataError(f"{path}: the data has {packed.tokens} tokens, fewer than seq_len + 1 = "
                        f"{seq_len + 1} (lower --seq-len)")
    if not packed.weights.any():
        raise DataError(f"{path}: no tokens to learn from (every token is part of a prompt)")
    return packed


def batch_at(packed: Packed, order, step: int, batch_size: int, rank: int = 0, size: int = 1):
    """The step-th batch: rows order[step * batch_size ...] (wrapping), as mx arrays
    (inputs, targets, target weights, input document ids); of data-parallel ranks, rank's share."""
    share = batch_size // size
    idx = [order[(step * batch_size + rank * share + i) % len(order)] for i in range(share)]
    ids, weights, docs = packed.ids[idx], packed.weights[idx], packed.docs[idx]
    # a target counts if it is weighted and its input token is of the same document
    target_weights = weights[:, 1:] * (docs[:, 1:] == docs[:, :-1])
    return (mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(target_weights),
            mx.array(docs[:, :-1]))
