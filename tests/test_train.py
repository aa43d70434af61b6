"""train.py / mlx_gdn.train (first step): learning, exact resume, atomic checkpoints, bad data, NaN."""

import json

import numpy as np
import pytest
import sentencepiece
from mlx.utils import tree_flatten

from mlx_gdn.generate import generate
from mlx_gdn.loading import load
from mlx_gdn.train import DataError, TrainConfig, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    text = "\n".join(f"the delta rule writes value {i % 7} under key {i % 3}." for i in range(1500))
    (tmp / "corpus.txt").write_text(text)
    sentencepiece.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "tokenizer"),
                                             vocab_size=30, minloglevel=2)
    return tmp


def config(corpus, out, **kw):
    base = dict(model="tiny-gdn", tokenizer=str(corpus / "tokenizer.model"), data=str(corpus / "corpus.txt"),
                out=str(out), seq_len=32, batch_size=4, iters=24, warmup=4, save_every=8, lr=3e-3)
    return TrainConfig(**dict(base, **kw))


def test_loss_decreases_and_outputs(corpus, tmp_path):
    train(config(corpus, tmp_path / "run"), progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(rows) == 24 and np.mean([r["loss"] for r in rows[-4:]]) < 0.5 * rows[0]["loss"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    model, tokenizer = load(str(tmp_path / "run" / "model"))  # the trained model generates
    assert generate(model, tokenizer, "the delta rule", max_tokens=8)


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_resume_gives_the_same_weights(corpus, tmp_path, monkeypatch):
    import mlx_gdn.train as training
    straight = weights(train(config(corpus, tmp_path / "a"), progress=False))
    calls = {"n": 0}
    real = training.batch_at  # called once a step here (no grad accumulation, no validation data)

    def interrupted(*args):  # Ctrl-C during step 19, after the step-16 checkpoint
        calls["n"] += 1
        if calls["n"] == 19:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(training, "batch_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config(corpus, tmp_path / "b"), progress=False)
    monkeypatch.setattr(training, "batch_at", real)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 16
    resumed = weights(train(config(corpus, tmp_path / "b", resume=True), progress=False))
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")]
    assert steps == list(range(1, 25))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    import mlx_gdn.train as training
    calls = {"n": 0}
    real = training.batch_at

    def poisoned(*args):  # the 11th step's loss is NaN (its target weights are)
        calls["n"] += 1
        inputs, targets, weights, docs = real(*args)
        return inputs, targets, weights * (float("nan") if calls["n"] == 11 else 1.0), docs

    monkeypatch.setattr(training, "batch_at", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 11; the last good checkpoint \(step 8\)"):
        train(config(corpus, tmp_path / "nan"), progress=False)
    state = json.loads((tmp_path / "nan" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8


@pytest.mark.parametrize("content,message", [
    ("", "no text"),
    ('{"text": "fine"}\n{"text": oops}\n', r"train.jsonl:2: not valid JSON"),
    ('{"text": "a", "extra": 1}\n', r"train.jsonl:1: expected a row \{\"text\": ...\}, .* got \['extra', 'text'\]"),
    ('{"messages": "hi"}\n', r"train.jsonl:1: messages must be a list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n' * 40, "train.jsonl: the model has no chat template"),
    ('{"text": "tiny"}\n', "fewer than seq_len"),
])
def test_bad_data(corpus, tmp_path, content, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        train(config(corpus, tmp_path / "out", data=str(tmp_path / "data")), progress=False)
