"""Parity with fla 0.6.0: tiny random GatedDeltaNetForCausalLM checkpoints and their logits, made on the
device by tests/fixtures/make_fla_fixtures.py (fla's fused_recurrent path, float32), loaded here as is."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_gdn.models import load_model
from reference import rms_rel

FIXTURES = Path(__file__).parent / "fixtures" / "fla"


@pytest.mark.parametrize("variant", ["plain", "gva", "negeig_tied"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_logits_match_fla(variant, mode, monkeypatch):
    from mlx_gdn.ops import gated_delta
    # the same 32 tokens through the chunked path and through the token loop
    monkeypatch.setattr(gated_delta, "RECURRENT_MAX_TOKENS", 64 if mode == "recurrent" else 0)
    model = load_model(FIXTURES / variant)
    ids = np.load(FIXTURES / variant / "input_ids.npy")
    ref = np.load(FIXTURES / variant / "logits.npy")
    got = np.array(model(mx.array(ids)))
    assert 1.0 < ref.std() < 2.0
    assert np.abs(got - ref).max() <= 1e-3  # the bound; measured 1e-5 to 5e-5
    assert rms_rel(ref, got) <= 1e-5


def test_fla_config_fields_are_kept(tmp_path):
    from mlx_gdn.models import save_model
    import json
    model = load_model(FIXTURES / "gva")
    assert model.args.num_v_heads == 4 and model.args.extra["fuse_norm"] is True
    save_model(model, tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["architectures"] == ["GatedDeltaNetForCausalLM"] and config["num_v_heads"] == 4
