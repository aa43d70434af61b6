"""Generation: greedy = a cache-free loop over full forwards, seeded sampling, samplers, streaming, CLI."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece
from mlx_lm.sample_utils import apply_top_k, apply_top_p

from mlx_gdn.generate import (Tokenizer, chat_prompt, generate, generate_batch, generate_tokens,
                              stream_generate)
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


def test_batch_rows_equal_single_runs(model, tokenizer):
    tok = Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)))
    prompts = ["the state decays", "the delta rule writes 12 values and the state", "values"]
    batch = generate_batch(model, tok, prompts, max_tokens=12)
    assert batch == [generate(model, tok, p, max_tokens=12) for p in prompts]


TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_chat_prompt_and_its_errors(tokenizer):
    plain = Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)))
    chat = Tokenizer(plain.backend, chat_template=TEMPLATE)
    assert chat_prompt(chat, "hi", system="be brief") == "[system] be brief\n[user] hi\n[assistant] "
    assert chat_prompt(chat, "hi", use_template=False) == "hi"
    assert chat_prompt(plain, "hi") == "hi"
    with pytest.raises(ValueError, match="system prompt needs the model's chat template"):
        chat_prompt(plain, "hi", system="be brief")
    bad = Tokenizer(plain.backend, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="chat template: only user turns"):
        chat_prompt(bad, "hi")


def test_prompt_longer_than_the_model_takes(tokenizer):
    tok = Tokenizer(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)))
    mx.random.seed(2)
    limited = Model(ModelArgs.from_dict(dict(PRESETS["tiny-gdn"], vocab_size=60, max_position_embeddings=16)))
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens; with max_tokens 10 that is more than "
                                         r"the model's 16"):
        generate(limited, tok, "the state decays and the delta rule writes", max_tokens=10)
    assert generate(limited, tok, "the state decays and the delta rule writes", max_tokens=10, max_context=64)


def test_cli_chat_and_prompts_file(model, tokenizer, tmp_path):
    save_model(model, tmp_path / "m", extra_files=[tokenizer])
    (tmp_path / "m" / "sp.model").rename(tmp_path / "m" / "tokenizer.model")
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(tmp_path / "m"),
                                     *a], capture_output=True, text=True, cwd=tmp_path)
    (tmp_path / "prompts.txt").write_text("the state\n\nthe delta rule writes\nvalues\n")
    out = run("--prompts-file", str(tmp_path / "prompts.txt"), "--max-tokens", "6")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 3
    bad = run("--prompt", "x", "--system", "be brief")  # this model has no chat template
    assert bad.returncode == 1 and "system prompt needs the model's chat template" in bad.stderr
    (tmp_path / "m" / "tokenizer_config.json").write_text('{"chat_template": "[user] {{ messages[-1].content }}"}')
    assert run("--prompt", "x", "--system", "be brief", "--max-tokens", "3").returncode == 0
    neither = run()
    assert neither.returncode == 2 and "--prompts-file" in neither.stderr
