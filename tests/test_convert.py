"""convert.py / mlx_gdn.convert on the fla fixtures (made by fla 0.6.0 on the device)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_gdn.convert import ConversionError, convert, to_hf
from mlx_gdn.models import load_model
from reference import rms_rel

FIXTURES = Path(__file__).parent / "fixtures" / "fla"
ROOT = Path(__file__).parent.parent


def fla_logits(variant):
    return np.load(FIXTURES / variant / "input_ids.npy"), np.load(FIXTURES / variant / "logits.npy")


@pytest.mark.parametrize("variant", ["plain", "gva", "negeig_tied"])
def test_convert_gives_fla_logits_and_round_trips_bit_identical(variant, tmp_path):
    convert(FIXTURES / variant, tmp_path / "mlx")
    ids, ref = fla_logits(variant)
    assert np.abs(np.array(load_model(tmp_path / "mlx")(mx.array(ids))) - ref).max() <= 1e-3
    to_hf(tmp_path / "mlx", tmp_path / "hf")
    a, b = load_file(FIXTURES / variant / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gated_deltanet" and config["attn"] is None


def test_bf16_and_quantized_conversions(tmp_path):
    ids, ref = fla_logits("gva")
    convert(FIXTURES / "gva", tmp_path / "bf16", dtype="bfloat16")
    model = load_model(tmp_path / "bf16")
    assert model.model.layers[0].attn.q_proj.weight.dtype == mx.bfloat16
    assert model.model.layers[0].attn.A_log.dtype == mx.float32
    assert rms_rel(ref, np.array(model(mx.array(ids)).astype(mx.float32))) <= 5e-2
    convert(FIXTURES / "gva", tmp_path / "q8", quantize=True, q_bits=8)
    q8_model = load_model(tmp_path / "q8")
    q8 = np.array(q8_model(mx.array(ids)))
    assert rms_rel(ref, q8) <= 5e-2  # measured ~1e-2 on this fixture
    # it generates: greedy tokens through the cache = a greedy loop of full forwards of the same model
    from mlx_gdn.generate import generate_tokens
    prompt = [int(t) for t in ids[0, :8]]
    cached = [int(t[0]) for t in generate_tokens(q8_model, mx.array([prompt]), 6)]
    loop = list(prompt)
    for _ in range(6):
        loop.append(int(mx.argmax(q8_model(mx.array([loop]))[0, -1])))
    assert cached == loop[len(prompt):]
    to_hf(tmp_path / "q8", tmp_path / "q8_hf")  # de-quantized on the way out
    back = load_file(tmp_path / "q8_hf" / "model.safetensors")
    assert back["model.layers.0.attn.q_proj.weight"].dtype == np.float32
    assert "model.layers.0.attn.q_proj.scales" not in back


def test_sharded_checkpoint_and_carried_files(tmp_path):
    src = tmp_path / "sharded"
    src.mkdir()
    weights = load_file(FIXTURES / "plain" / "model.safetensors")
    names = sorted(weights)
    weights["model.layers.0.attn.D"] = np.ones(2, np.float32)  # older checkpoints: ignored
    shards = {"model-00001-of-00002.safetensors": names[:20] + ["model.layers.0.attn.D"],
              "model-00002-of-00002.safetensors": names[20:]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(src / file), metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    shutil.copy(FIXTURES / "plain" / "config.json", src)
    (src / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    convert(src, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    ids, ref = fla_logits("plain")
    assert np.abs(np.array(load_model(tmp_path / "out")(mx.array(ids))) - ref).max() <= 1e-3


def broken_copy(tmp_path, edit):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "plain", src)
    edit(src)
    return src


def _edit_weights(change):
    def edit(src):
        weights = load_file(src / "model.safetensors")
        change(weights)
        save_file(weights, str(src / "model.safetensors"))
    return edit


def _set_model_type(src):
    (src / "config.json").write_text(json.dumps(
        dict(json.loads((src / "config.json").read_text()), model_type="llama")))


BAD = [
    ("unknown keys \\['model.layers.0.attn.extra'\\]",
     _edit_weights(lambda w: w.update({"model.layers.0.attn.extra": np.zeros(1, np.float32)}))),
    ("missing keys \\['model.norm.weight'\\]", _edit_weights(lambda w: w.pop("model.norm.weight"))),
    (r"model.norm.weight has shape \(63,\), expected \(64,\)",
     _edit_weights(lambda w: w.update({"model.norm.weight": np.ones(63, np.float32)}))),
    ("unsupported model_type 'llama'", _set_model_type),
    ("corrupt or truncated safetensors",
     lambda src: (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000])),
    ("no config.json", lambda src: [p.unlink() for p in src.iterdir()]),
]


@pytest.mark.parametrize("message,edit", BAD, ids=[m.split()[0] for m, _ in BAD])
def test_bad_inputs_name_the_problem_and_write_nothing(tmp_path, message, edit):
    src = broken_copy(tmp_path, edit)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists \\(use --force"):
        convert(FIXTURES / "plain", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(FIXTURES / "plain", tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "convert.py"), *a], capture_output=True,
                                    text=True, cwd=tmp_path)
    ok = run("--hf-path", str(FIXTURES / "plain"), "--mlx-path", str(tmp_path / "m"), "--dtype", "float32")
    assert ok.returncode == 0 and "wrote" in ok.stdout
    bad = run("--hf-path", str(tmp_path / "nowhere"), "--mlx-path", str(tmp_path / "x"))
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "no such model directory" in bad.stderr


def _hub_cache(root: Path, repo: str, source: Path):
    """A Hugging Face cache holding `repo` (what snapshot_download leaves behind)."""
    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)


def test_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    _hub_cache(tmp_path / "hf", "fla-hub/tiny-gdn", FIXTURES / "plain")
    convert("fla-hub/tiny-gdn", tmp_path / "out")
    ids, ref = fla_logits("plain")
    assert np.abs(np.array(load_model(tmp_path / "out")(mx.array(ids))) - ref).max() <= 1e-3
    with pytest.raises(FileNotFoundError, match="not a local directory, and the hub download failed"):
        convert("fla-hub/not-cached", tmp_path / "out2")
