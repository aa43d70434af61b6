"""NVlabs GatedDeltaNet (lit_gpt) training checkpoints: their configs and their key layout.

lit_gpt names (SPEC §4) and ours: transformer.wte / ln_f -> model.embeddings / model.norm; per block
norm_1 / norm_2 -> attn_norm / mlp_norm; GDN attn.gk_proj -> a_proj, attn.g_norm_swish_gate -> o_norm,
attn.D (unused) dropped, b_proj keeps its bias; attention attn.attn (q, k, v fused per query group:
rows [q_0 .. q_{r-1}, k, v] of each group) split into q/k/v_proj, attn.proj -> o_proj; MLP
mlp.swiglu.w1 / w2 / w3 -> gate_proj / up_proj / down_proj; lm_head is tied to wte.
"""

import json
import re
from pathlib import Path

import mlx.core as mx

from .models import PRESETS, ModelArgs
from .models.io import CheckpointError

# NVlabs config name -> our preset of the same shape (lit_gpt/config.py)
CONFIGS = {"GatedDeltaNet_0.4B": "gdn-0.4b", "GatedDeltaNet_1.3B": "gdn-1.3b",
           "GatedDeltaNet_H1_0.4B": "h1-0.4b", "GatedDeltaNet_H1_1.3B": "h1-1.3b"}
PREFIXES = ("_forward_module.", "_orig_mod.", "module.")

RENAMES = [
    (r"transformer\.wte\.weight", "model.embeddings.weight"),
    (r"transformer\.ln_f\.weight", "model.norm.weight"),
    (r"transformer\.h\.(\d+)\.norm_1\.weight", r"model.layers.\1.attn_norm.weight"),
    (r"transformer\.h\.(\d+)\.norm_2\.weight", r"model.layers.\1.mlp_norm.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.swiglu\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.swiglu\.w2\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"transformer\.h\.(\d+)\.mlp\.swiglu\.w3\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.gk_proj\.weight", r"model.layers.\1.attn.a_proj.weight"),
    (r"transformer\.h\.(\d+)\.attn\.g_norm_swish_gate\.weight", r"model.layers.\1.attn.o_norm.weight"),
    (r"transformer\.h\.(\d+)\.attn\.proj\.(weight|bias)", r"model.layers.\1.attn.o_proj.\2"),
    (r"transformer\.h\.(\d+)\.attn\.(.+)", r"model.layers.\1.attn.\2"),
]


def state_dict(raw: dict, source) -> dict:
    """The weights of a Fabric checkpoint ({"model": ..., "optimizer": ...}) or of a bare state dict,
    without wrapper prefixes."""
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source}: no state dict (expected a Fabric checkpoint with 'model' "
                              "or a bare state dict)")
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value
    return out


def model_args(state: dict, config=None, source="") -> ModelArgs:
    """Our ModelArgs for an NVlabs checkpoint: a config name, a config.json of ours, or inferred
    from the tensors (width, depth, attention layers) when it matches a published config."""
    if config is not None and str(config).endswith(".json"):
        return ModelArgs.from_dict(json.loads(Path(config).read_text()))
    if config is not None and config not in CONFIGS:
        raise CheckpointError(f"unknown NVlabs config {config!r}: one of {sorted(CONFIGS)} or a "
                              "config.json path")
    if config is None:
        if "transformer.wte.weight" not in state:
            raise CheckpointError(f"{source}: not an NVlabs lit_gpt checkpoint (no transformer.wte.weight)")
        width = state["transformer.wte.weight"].shape[1]
        depth = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
        hybrid = any(k.endswith(".attn.attn.weight") for k in state)
        for name, preset in CONFIGS.items():
            p = PRESETS[preset]
            if (p["hidden_size"], p["num_hidden_layers"], "layer_types" in p) == (width, depth, hybrid):
                config = name
                break
        else:
            raise CheckpointError(f"{source}: hidden size {width}, {depth} layers"
                                  f"{', with attention' if hybrid else ''} match no published NVlabs "
                                  "config: give --nvlabs-config <config.json>")
    return ModelArgs(**dict(PRESETS[CONFIGS[config]], b_proj_bias=True))


def sanitize(state: dict, args: ModelArgs) -> dict:
    """NVlabs names and layout -> ours (see the module docstring)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".attn.D") or (key == "lm_head.weight" and args.tie_word_embeddings):
            continue
        fused = re.fullmatch(r"transformer\.h\.(\d+)\.attn\.attn\.(weight|bias)", key)
        if fused:
            prefix = f"model.layers.{fused.group(1)}.attn"
            out.update({f"{prefix}.{name}_proj.{fused.group(2)}": part
                        for name, part in zip("qkv", split_qkv(value, args))})
            continue
        for pattern, replacement in RENAMES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    return out


def split_qkv(fused, args: ModelArgs):
    """lit_gpt's fused QKV rows, per query group g: its r = heads / groups query heads, then its key
    and its value head -> (q, k, v) rows in head order (query head g * r + j)."""
    heads = args.attn_num_heads or args.num_heads
    groups = args.attn_num_kv_heads or heads
    size = args.hidden_size // heads
    r = heads // groups
    per_group = fused.reshape(groups, r + 2, size, *fused.shape[1:])
    q = per_group[:, :r].reshape(heads * size, *fused.shape[1:])
    k = per_group[:, r].reshape(groups * size, *fused.shape[1:])
    v = per_group[:, r + 1].reshape(groups * size, *fused.shape[1:])
    return mx.contiguous(q), mx.contiguous(k), mx.contiguous(v)
