"""The embedded default model (mlx_gdn/default_model, made by scripts/make_default_model.py)."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_gdn
from mlx_gdn.generate import DEFAULT_MODEL, generate

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(),
                                reason="no embedded model in this checkout")


def test_committed_sample_is_the_greedy_continuation():
    """SAMPLE.txt holds its prompt and 40 greedy tokens; the continuation is recomputed here without any
    cache (one full forward per token) and must match both the file and generate()."""
    prompt, sample = (DEFAULT_MODEL / "SAMPLE.txt").read_text().split("\n---\n", 1)
    model, tokenizer = mlx_gdn.load(DEFAULT_MODEL)
    ids = tokenizer.encode(prompt)
    n_prompt = len(ids)
    for _ in range(40):
        token = mx.argmax(model(mx.array([ids]))[0, -1]).item()
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
    reference = tokenizer.decode(ids[n_prompt:])
    assert sample.rstrip("\n") == reference
    assert generate(model, tokenizer, prompt, max_tokens=40) == reference


def test_generate_cli_runs_on_the_default():
    out = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--prompt", "The for statement",
                          "--max-tokens", "12"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip()
