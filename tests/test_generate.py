"""Generation: greedy = a cache-free loop over full forwards, seeded sampling, samplers, streaming, CLI."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from mlx_gdn.generate import Tokenizer, generate, generate_tokens, stream_generate
from mlx_gdn.models import PRESETS, Model, ModelArgs, save_model

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(f"the state decays and the delta rule writes {i} values" for i in range(300)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / "sp"),
                                             vocab_size=60, minloglevel=2)
    return tmp / "sp.model"


@pytest.fixture(scope="module")
def model():
    mx.random.seed(1)
    return Model(ModelArgs(**dict(PRESETS["tiny-h1"], vocab_size=60)))  # GDN + sliding-window layers


def test_greedy_equals_cache_free_loop(model):
    prompt = mx.array([[3, 17, 42, 5, 9, 50, 7]])
    got = [t.item() for t in generate_tokens(model, prompt, 40)]
    ids = prompt[0].tolist()
    for _ in range(40):  # window 32: the run passes it
        ids.append(mx.argmax(model(mx.array([ids]))[0, -1]).item())
    assert got == ids[7:]


def test_seeded_sampling_is_reproducible(model, tokenizer):
    tok = Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)))
    runs = []
    for _ in range(2):
        mx.random.seed(7)
        runs.append(generate(model, tok, "the state", max_tokens=20, temp=1.0, top_p=0.9))
    mx.random.seed(8)
    other = generate(model, tok, "the state", max_tokens=20, temp=1.0, top_p=0.9)
    assert runs[0] == runs[1] and runs[0] != other


def test_top_k_and_top_p_masks():
    logprobs = mx.log(mx.array([[0.5, 0.05, 0.3, 0.15]]))
    kept = np.isfinite(np.array(apply_top_k(logprobs, 2)))[0]
    assert kept.tolist() == [True, False, True, False]
    kept = np.isfinite(np.array(apply_top_p(logprobs, 0.7)))[0]  # 0.5 + 0.3 reach 0.7
    assert kept.tolist() == [True, False, True, False]
    kept = np.isfinite(np.array(apply_top_p(logprobs, 0.9)))[0]  # + 0.15
    assert kept.tolist() == [True, False, True, True]


def test_streaming_equals_non_streaming_and_stops(model, tokenizer):
    tok = Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)))
    pieces = list(stream_generate(model, tok, "the delta", max_tokens=25))
    assert "".join(r.text for r in pieces) == generate(model, tok, "the delta", max_tokens=25)
    assert pieces[-1].finish_reason in ("length", "stop")
    full = generate(model, tok, "the delta", max_tokens=25)
    k = next(k for k in range(len(full) // 2, len(full) - 1) if not full[k:k + 2].isspace())
    stop = full[k:k + 2]
    assert generate(model, tok, "the delta", max_tokens=25, stop=(stop,)) == full[:full.index(stop)]


def test_bad_input(model, tokenizer):
    tok = Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)))
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tok, "")
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        generate(model, tok, "x", max_tokens=0)


def test_cli_end_to_end(model, tokenizer, tmp_path):
    save_model(model, tmp_path / "m", extra_files=[tokenizer])
    (tmp_path / "m" / "sp.model").rename(tmp_path / "m" / "tokenizer.model")
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "generate.py"), *a], capture_output=True,
                                    text=True, cwd=tmp_path)
    ok = run("--model", str(tmp_path / "m"), "--prompt", "the state", "--max-tokens", "10", "--verbose")
    assert ok.returncode == 0 and "generation: " in ok.stderr and ok.stdout.strip()
    for args, message in [(("--model", str(tmp_path / "nope"), "--prompt", "x"), "no such model directory"),
                          (("--model", str(tmp_path / "m"), "--prompt", ""), "prompt is empty"),
                          (("--model", str(tmp_path / "m"), "--prompt", "x", "--max-tokens", "0"),
                           "max_tokens must be at least 1")]:
        bad = run(*args)
        assert bad.returncode == 1 and message in bad.stderr and bad.stderr.count("\n") == 1
