"""NVlabs lit_gpt checkpoints: the fused-QKV split against NVlabs' own attention code (fixture made
by tests/fixtures/make_nvlabs_fixtures.py under torch), and .pth conversion end to end."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gdn import nvlabs
from mlx_gdn.convert import ConversionError, convert, to_hf
from mlx_gdn.layers import Attention
from mlx_gdn.models import Model, ModelArgs, load_model

torch = pytest.importorskip("torch")
FIXTURE = Path(__file__).parent / "fixtures" / "nvlabs" / "attention.npz"


def test_qkv_split_matches_nvlabs_attention():
    f = np.load(FIXTURE)
    heads, groups, hidden = int(f["n_head"]), int(f["n_query_groups"]), f["x"].shape[-1]
    args = ModelArgs(hidden_size=hidden, attn_num_heads=heads, attn_num_kv_heads=groups)
    attn = Attention(hidden, heads, groups)
    q, k, v = nvlabs.split_qkv(mx.array(f["attn_weight"]), args)
    attn.update({"q_proj": {"weight": q}, "k_proj": {"weight": k}, "v_proj": {"weight": v},
                 "o_proj": {"weight": mx.array(f["proj_weight"])}})
    out = np.array(attn(mx.array(f["x"])))
    np.testing.assert_allclose(out, f["out"], rtol=1e-4, atol=1e-5)


TINY_H1 = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_dim=8, num_heads=3, expand_v=2,
               hidden_ratio=2, layer_types=["gdn", "swa"], attn_num_heads=4, attn_num_kv_heads=2,
               window_size=8, tie_word_embeddings=True, b_proj_bias=True, norm_eps=1e-5)


def lit_gpt_state(model: Model) -> dict:
    """Our weights under lit_gpt's names and layout (the inverse of nvlabs.sanitize), plus what
    lit_gpt stores that we drop: attn.D and the tied lm_head."""
    args, state = model.args, {}
    inverse = {"model.embeddings.weight": "transformer.wte.weight", "model.norm.weight": "transformer.ln_f.weight"}
    heads, groups = args.attn_num_heads, args.attn_num_kv_heads
    size, r = args.hidden_size // heads, heads // groups
    params = dict(tree_flatten(model.parameters()))
    for key, value in params.items():
        value = torch.tensor(np.array(value))
        if key in inverse:
            state[inverse[key]] = value
            continue
        i, rest = key.split(".")[2], ".".join(key.split(".")[3:])
        name = {"attn_norm.weight": "norm_1.weight", "mlp_norm.weight": "norm_2.weight",
                "mlp.gate_proj.weight": "mlp.swiglu.w1.weight", "mlp.up_proj.weight": "mlp.swiglu.w2.weight",
                "mlp.down_proj.weight": "mlp.swiglu.w3.weight", "attn.a_proj.weight": "attn.gk_proj.weight",
                "attn.o_norm.weight": "attn.g_norm_swish_gate.weight"}.get(rest, rest)
        if args.layer_types[int(i)] == "swa":
            if rest.startswith(("attn.k_proj", "attn.v_proj")):
                continue
            if rest == "attn.q_proj.weight":  # fuse per query group: q_g0 .. q_g(r-1), k_g, v_g
                q = value.numpy().reshape(groups, r, size, -1)
                k = np.array(params[key.replace("q_proj", "k_proj")]).reshape(groups, 1, size, -1)
                v = np.array(params[key.replace("q_proj", "v_proj")]).reshape(groups, 1, size, -1)
                state[f"transformer.h.{i}.attn.attn.weight"] = torch.tensor(
                    np.concatenate([q, k, v], axis=1).reshape(-1, q.shape[-1]))
                continue
            name = name.replace("attn.o_proj", "attn.proj")
        state[f"transformer.h.{i}.{name}"] = value
        if rest == "attn.A_log":
            state[f"transformer.h.{i}.attn.D"] = torch.ones_like(value)
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


@pytest.fixture
def tiny(tmp_path):
    mx.random.seed(5)
    model = Model(ModelArgs(**TINY_H1))
    params = [(k, mx.random.normal(v.shape) * 0.3 + (1.0 if k.endswith("norm.weight") else 0.0))
              for k, v in tree_flatten(model.parameters()) if not k.endswith(("A_log", "dt_bias"))]
    model.load_weights(params, strict=False)
    fabric = {"model": {f"_forward_module.{k}": v for k, v in lit_gpt_state(model).items()},
              "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "iter_num": 10, "step_count": 5,
              "hparams": {"name": "tiny"}}
    torch.save(fabric, tmp_path / "iter-10-ckpt.pth")
    (tmp_path / "config.json").write_text(json.dumps(TINY_H1))
    return model, tmp_path


def test_pth_conversion_gives_the_same_logits(tiny):
    model, tmp = tiny
    convert(tmp / "iter-10-ckpt.pth", tmp / "out", nvlabs_config=str(tmp / "config.json"))
    ids = mx.array([[3, 9, 27, 1, 50, 7, 7, 12, 40, 2, 33, 5]])
    np.testing.assert_allclose(np.array(load_model(tmp / "out")(ids)), np.array(model(ids)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConversionError, match="b_proj bias"):  # fla's layer cannot hold it
        to_hf(tmp / "out", tmp / "hf")


def test_pth_bad_input(tiny):
    _, tmp = tiny
    with pytest.raises(ConversionError, match="match no published NVlabs config"):
        convert(tmp / "iter-10-ckpt.pth", tmp / "a")
    with pytest.raises(ConversionError, match="unknown NVlabs config 'GDN_9B'"):
        convert(tmp / "iter-10-ckpt.pth", tmp / "b", nvlabs_config="GDN_9B")
    state = torch.load(tmp / "iter-10-ckpt.pth", weights_only=True)
    state["model"]["transformer.h.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp / "extra.pth")
    with pytest.raises(ConversionError, match=r"unknown keys \['model.layers.0.attn.extra.weight'\]"):
        convert(tmp / "extra.pth", tmp / "c", nvlabs_config=str(tmp / "config.json"))
    torch.save({"model": {"x": torch.zeros(1)}, "hook": Path("/")}, tmp / "code.pth")  # needs a class
    with pytest.raises(ConversionError, match="refused or unreadable"):
        convert(tmp / "code.pth", tmp / "d")
    assert not any((tmp / n).exists() for n in "abcd")


def test_published_configs_are_recognised():
    args = nvlabs.model_args({}, "GatedDeltaNet_H1_0.4B")
    assert args.b_proj_bias and args.layer_types[:2] == ["gdn", "swa"] and args.hidden_size == 1536
    # inference from the tensors' shapes alone (no weights materialised: shape-only stand-ins)
    shape = lambda *s: np.empty(s, dtype=np.uint8)
    state = {"transformer.wte.weight": shape(32000, 2400)}
    state.update({f"transformer.h.{i}.norm_1.weight": shape(2400) for i in range(16)})
    assert nvlabs.model_args(state).hidden_size == 2400
