"""Model stacks: logits against a float64 NumPy forward written from SPEC §2-§3, caches, padding, errors.
(Parity with fla's own checkpoints needs fixtures made on the device: issue 5.)"""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gdn.models import Model, ModelArgs
from reference import rms_rel
from reference_model import model_reference

BASE = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, head_dim=8, num_heads=2,
            hidden_ratio=2, norm_eps=1e-6)
CONFIGS = {
    "gdn": dict(BASE),
    "gdn-gva-neg-tied": dict(BASE, num_v_heads=4, allow_neg_eigval=True, tie_word_embeddings=True),
    "h1-swa": dict(BASE, num_hidden_layers=3, layer_types=["gdn", "swa", "gdn"], attn_num_heads=4,
                   attn_num_kv_heads=2, window_size=16),
    "attn": dict(BASE, layer_types=["attn", "gdn"], attn_num_heads=4),
    "h2": dict(BASE, num_hidden_layers=3, layer_types=["mamba2", "gdn", "swa"], attn_num_heads=4,
               window_size=16, mamba_state_size=8, mamba_head_dim=16, mamba_n_groups=2),
}


def make_model(name, seed=0):
    mx.random.seed(seed)
    model = Model(ModelArgs(**CONFIGS[name]))
    # random (not zero-initialised) norms and convs, so every parameter matters
    params = {k: mx.random.normal(v.shape) * (0.3 if v.ndim > 1 else 0.2) + (1.0 if k.endswith("norm.weight") else 0.0)
              for k, v in tree_flatten(model.parameters()) if not k.endswith(("A_log", "dt_bias"))}
    model.load_weights(list(params.items()), strict=False)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_float64_reference(name):
    model = make_model(name)
    ids = np.random.default_rng(1).integers(0, 97, (2, 40))
    weights = {k: np.array(v, np.float64) for k, v in tree_flatten(model.parameters())}
    ref = model_reference(weights, dataclasses.asdict(model.args), ids)
    got = np.array(model(mx.array(ids)))
    assert rms_rel(ref, got) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_prefill_and_steps_equal_full_forward(name):
    # 100 tokens of prefill, then 50 single steps; the SWA window (16) is far shorter than the prompt
    model = make_model(name, seed=2)
    ids = mx.array(np.random.default_rng(3).integers(0, 97, (2, 150)))
    full = np.array(model(ids))
    cache = model.make_cache()
    parts = [model(ids[:, :100], cache=cache)]
    for t in range(100, 150):
        parts.append(model(ids[:, t:t + 1], cache=cache))
    stepped = np.array(mx.concatenate(parts, axis=1))
    # float32 through 150 tokens: with allow_neg_eigval both the full and the stepped logits are
    # ~2e-4 (max) / 4e-6 (RMS-relative) from a float64 forward, so they agree to that and no better
    assert rms_rel(full, stepped) <= 1e-5
    assert np.abs(stepped - full).max() <= 5e-4


def test_swa_cache_stays_bounded():
    model = make_model("h1-swa")
    cache = model.make_cache()
    model(mx.zeros((1, 100), dtype=mx.int32), cache=cache)
    for _ in range(20):
        model(mx.zeros((1, 1), dtype=mx.int32), cache=cache)
    assert cache[1].keys.shape[2] == 15  # window 16: the token itself plus 15 kept


@pytest.mark.parametrize("name", ["gdn", "h1-swa", "attn", "h2"])
def test_left_padded_batch_equals_rows_alone(name):
    model = make_model(name, seed=4)
    rng = np.random.default_rng(5)
    rows = [rng.integers(1, 97, n) for n in (30, 17, 24)]
    T = max(len(r) for r in rows)
    ids = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, True
    cache = model.make_cache()
    batched = model(mx.array(ids), mask=mx.array(mask), cache=cache)
    step = model(mx.array([[5], [6], [7]]), mask=mx.ones((3, 1), dtype=mx.bool_), cache=cache)
    for i, r in enumerate(rows):
        alone_cache = model.make_cache()
        alone = np.array(model(mx.array(r[None]), cache=alone_cache))
        np.testing.assert_allclose(np.array(batched[i, T - len(r):]), alone[0], atol=1e-4, rtol=1e-4)
        alone_step = np.array(model(mx.array([[5 + i]]), cache=alone_cache))
        np.testing.assert_allclose(np.array(step[i]), alone_step[0], atol=1e-4, rtol=1e-4)


def test_fla_hybrid_spec_becomes_layer_types():
    args = ModelArgs.from_dict(dict(BASE, num_hidden_layers=4, attn={"layers": [1, 3], "num_heads": 4,
                                                                     "window_size": 64}, fuse_norm=True))
    assert args.layer_types == ["gdn", "swa", "gdn", "swa"]
    assert args.window_size == 64 and args.attn_num_heads == 4 and args.extra == {"fuse_norm": True}


def test_bad_configs_and_caches():
    with pytest.raises(ValueError, match=r"unknown layer types \['mamba3'\]"):
        ModelArgs(**dict(BASE, layer_types=["gdn", "mamba3"]))
    with pytest.raises(ValueError, match="layer_types has 1 entries for num_hidden_layers = 2"):
        ModelArgs(**dict(BASE, layer_types=["gdn"]))
    with pytest.raises(ValueError, match="'swa' layers need window_size"):
        ModelArgs(**dict(BASE, layer_types=["gdn", "swa"]))
    with pytest.raises(ValueError, match=r"num_v_heads \(3\) must be a multiple of num_heads \(2\)"):
        Model(ModelArgs(**dict(BASE, num_v_heads=3)))
    with pytest.raises(ValueError, match=r"hidden_size \(48\) must divide by num_heads \(5\)"):
        Model(ModelArgs(**dict(BASE, layer_types=["attn", "gdn"], attn_num_heads=5)))
    model = make_model("h1-swa")
    with pytest.raises(ValueError, match="cache does not belong to this model"):
        model(mx.zeros((1, 3), dtype=mx.int32), cache=make_model("gdn").make_cache())


@pytest.mark.parametrize("name", ["gdn", "h1-swa", "attn", "h2"])
def test_packed_rows_keep_documents_apart(name):
    # row 0 packs documents of 5, 40 and 11 tokens, row 1 one of 30 and one of 26: every document's
    # logits equal those of the document run alone (40 tokens > 16: the GDN op's chunked path)
    model = make_model(name)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, BASE["vocab_size"], (2, 56))
    lengths = [[5, 40, 11], [30, 26]]
    segments = np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths])
    packed = np.array(model(mx.array(ids), segments=mx.array(segments)))
    for row, ls in enumerate(lengths):
        for doc, start in enumerate(np.cumsum([0] + ls[:-1])):
            alone = np.array(model(mx.array(ids[row:row + 1, start:start + ls[doc]])))[0]
            assert rms_rel(alone, packed[row, start:start + ls[doc]]) < 1e-5, (row, doc)


def test_packed_rows_errors():
    ids = mx.zeros((1, 8), dtype=mx.int32)
    with pytest.raises(ValueError, match="shape"):
        make_model("gdn")(ids, segments=mx.zeros((1, 7), dtype=mx.int32))
