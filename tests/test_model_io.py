"""Saving, loading and quantizing models."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gdn.models import from_preset, load_model, quantize_model, save_model
from reference import rms_rel


@pytest.fixture
def model():
    mx.random.seed(0)
    return from_preset("tiny-h1")


IDS = mx.array(np.random.default_rng(0).integers(0, 512, (2, 50)))


def test_save_and_load_round_trip(model, tmp_path):
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    np.testing.assert_array_equal(np.array(loaded(IDS)), np.array(model(IDS)))
    assert not list(tmp_path.glob(".m.*")), "temporary directory left behind"


def test_weights_over_the_shard_limit_are_sharded_with_an_index(model, tmp_path, monkeypatch):
    from mlx_gdn.models import io
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    monkeypatch.setattr(io, "MAX_SHARD_BYTES", total // 3)
    save_model(model, tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(set(index.values())) == files
    for f in files:  # every shard within the limit, except a single tensor larger than it
        shard = mx.load(str(tmp_path / "m" / f))
        assert len(shard) == 1 or sum(v.nbytes for v in shard.values()) <= total // 3
    loaded = load_model(tmp_path / "m")
    np.testing.assert_array_equal(np.array(loaded(IDS)), np.array(model(IDS)))


def dequantized_copy(quantized):
    """A float model holding the quantized model's dequantized weights."""
    mx.random.seed(0)
    plain = from_preset("tiny-h1")
    weights = {}
    for name, module in quantized.named_modules():
        if hasattr(module, "scales"):
            weights[name + ".weight"] = mx.dequantize(module.weight, module.scales, module.biases,
                                                      module.group_size, module.bits)
    plain.load_weights(list(weights.items()), strict=False)
    return plain


# Logit tolerances against the float model (RMS-relative, tiny random weights, group size 64):
# measured 0.028 (8-bit) and 0.45 (4-bit); a quantized model must also equal the float model
# holding its dequantized weights (1e-5), which checks the quantized layers themselves.
@pytest.mark.parametrize("bits,tol", [(8, 5e-2), (4, 6e-1)])
def test_quantized_close_to_float_and_reloads(model, tmp_path, bits, tol):
    ref = np.array(model(IDS))
    quantize_model(model, bits=bits, group_size=64)
    got = np.array(model(IDS))
    assert rms_rel(ref, got) <= tol
    assert rms_rel(np.array(dequantized_copy(model)(IDS)), got) <= 1e-5
    assert "QuantizedLinear" in str(type(model.model.layers[0].attn.q_proj))
    save_model(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == \
        {"bits": bits, "group_size": 64}
    np.testing.assert_array_equal(np.array(load_model(tmp_path / "q")(IDS)), got)


def test_bad_directories(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path)
    save_model(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or truncated safetensors"):
        load_model(tmp_path / "m")
    save_model(from_preset("tiny-gdn"), tmp_path / "g")
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "g" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="unknown keys"):  # tiny-gdn weights in a tiny-h1 directory
        load_model(tmp_path / "m")
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(model, bits=3)


def test_load_returns_model_and_tokenizer(model, tmp_path):
    import sentencepiece
    import mlx_gdn
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the gated delta rule number {i} decays and writes" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=40, minloglevel=2)
    save_model(model, tmp_path / "m", extra_files=[tmp_path / "sp.model"])
    (tmp_path / "m" / "sp.model").rename(tmp_path / "m" / "tokenizer.model")
    loaded, tokenizer = mlx_gdn.load(str(tmp_path / "m"))
    assert tokenizer.decode(tokenizer.encode("the gated delta rule")) == "the gated delta rule"
    np.testing.assert_array_equal(np.array(loaded(IDS)), np.array(model(IDS)))
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        mlx_gdn.load(str(tmp_path / "missing"))
