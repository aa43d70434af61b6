"""Gated DeltaNet causal LM and its hybrids (fla's `gated_deltanet` model type, HF layout).

Blocks follow `layer_types`: "gdn" (Gated DeltaNet), "swa" (attention with a sliding window),
"attn" (full attention), "mamba2" (Mamba2 SSD mixer, for the paper's H2 hybrid). Pre-norm as fla: x + mixer(attn_norm(x)), then + mlp(mlp_norm(x)).
Parameter names are fla's state-dict keys, so fla checkpoints load without renaming.
"""

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..layers import Attention, GatedDeltaNet, Mamba2, SwiGLU
from ..layers.documents import Documents
from .cache import AttentionCache, GatedDeltaNetCache, Mamba2Cache

LAYER_TYPES = ("gdn", "swa", "attn", "mamba2")
CACHES = {"gdn": GatedDeltaNetCache, "swa": AttentionCache, "attn": AttentionCache,
          "mamba2": Mamba2Cache}


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 21
    head_dim: int = 256
    num_heads: int = 6
    num_v_heads: Optional[int] = None
    expand_v: float = 2.0
    conv_size: int = 4
    use_gate: bool = True
    use_short_conv: bool = True
    allow_neg_eigval: bool = False
    b_proj_bias: bool = False  # NVlabs' lit_gpt layer has one (fla's has not)
    hidden_ratio: int = 4
    intermediate_size: Optional[int] = None
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # hybrids: one type per layer; attention layers use the attn_* settings
    layer_types: Optional[List[str]] = None
    attn_num_heads: Optional[int] = None
    attn_num_kv_heads: Optional[int] = None
    attn_qkv_bias: bool = False
    window_size: Optional[int] = None
    rope_theta: float = 10000.0
    # Mamba2 layers (mamba_ssm defaults)
    mamba_state_size: int = 128
    mamba_expand: int = 2
    mamba_head_dim: int = 64
    mamba_n_groups: int = 1
    quantization: Optional[dict] = None  # {"bits", "group_size"} of a quantized model
    model_type: str = "gated_deltanet"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.intermediate_size is None:
            hidden = int(self.hidden_size * self.hidden_ratio * 2 / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)
        if self.layer_types is None:
            self.layer_types = ["gdn"] * self.num_hidden_layers
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"config: layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers = {self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"config: unknown layer types {unknown}; known: {list(LAYER_TYPES)}")
        if "swa" in self.layer_types and not self.window_size:
            raise ValueError("config: 'swa' layers need window_size")

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """From our config.json or fla's (its `attn` hybrid spec becomes layer_types)."""
        config = dict(config)
        attn = config.pop("attn", None)
        if attn:
            specs = attn if isinstance(attn, list) else [attn]
            if len({(s.get("num_heads"), s.get("num_kv_heads"), s.get("rope_theta")) for s in specs}) > 1:
                raise ValueError("config: attention specs with different head counts or rope_theta "
                                 "are not supported")
            n = config.get("num_hidden_layers", cls.num_hidden_layers)
            types = ["gdn"] * n
            for spec in specs:
                for i in spec["layers"]:
                    types[i] = "swa" if spec.get("window_size") else "attn"
            spec = specs[0]
            config.update(layer_types=types, attn_num_heads=spec.get("num_heads"),
                          attn_num_kv_heads=spec.get("num_kv_heads"),
                          attn_qkv_bias=spec.get("qkv_bias", False),
                          window_size=spec.get("window_size"),
                          rope_theta=spec.get("rope_theta", 10000.0))
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in config.items() if k in names},
                   extra={k: v for k, v in config.items() if k not in names})


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.attn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        if layer_type == "mamba2":
            self.attn = Mamba2(args.hidden_size, args.mamba_state_size, args.mamba_expand,
                               args.mamba_head_dim, args.mamba_n_groups, args.conv_size, args.norm_eps)
        elif layer_type == "gdn":
            self.attn = GatedDeltaNet(args.hidden_size, args.head_dim, args.num_heads, args.num_v_heads,
                                      args.expand_v, args.conv_size, args.use_gate,
                                      args.use_short_conv, args.allow_neg_eigval, args.norm_eps,
                                      args.b_proj_bias)
        else:
            self.attn = Attention(args.hidden_size, args.attn_num_heads or args.num_heads,
                                  args.attn_num_kv_heads,
                                  args.window_size if layer_type == "swa" else None,
                                  args.rope_theta, args.attn_qkv_bias)
        self.mlp_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.mlp = SwiGLU(args.hidden_size, args.intermediate_size)

    def __call__(self, x, mask=None, cache=None, segments=None):
        extra = {} if segments is None else {"segments": segments}
        x = x + self.attn(self.attn_norm(x), mask=mask, cache=cache, **extra)
        return x + self.mlp(self.mlp_norm(x))


def _checkpointed(layer, x, mask, segments):
    """layer(x) whose activations are recomputed in the backward instead of kept (mx.checkpoint)."""
    def inner(params, x):
        layer.update(params)
        return layer(x, mask=mask, segments=segments)
    return mx.checkpoint(inner)(layer.trainable_parameters(), x)


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, t) for t in args.layer_types]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.grad_checkpoint = False  # training: recompute each block in the backward
        self.conv_size = args.conv_size

    def __call__(self, input_ids, mask=None, cache=None, segments=None):
        x = self.embeddings(input_ids)
        if segments is not None:  # what every layer derives from the document ids, once
            segments = Documents(segments, max_lag=self.conv_size - 1)
        for i, layer in enumerate(self.layers):
            if self.grad_checkpoint and cache is None:
                x = _checkpointed(layer, x, mask, segments)
            else:
                x = layer(x, mask=mask, cache=None if cache is None else cache[i], segments=segments)
        return self.norm(x)


class Model(nn.Module):
    """model(input_ids [B, T], mask=None, cache=None) -> logits [B, T, vocab].

    mask [B, T]: True for real tokens (left padding only). cache: model.make_cache(), updated in place.
    segments [B, T]: document ids for packed training rows (documents never see each other; no cache).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids, mask=None, cache=None, segments=None):
        return self.head(self.hidden(input_ids, mask=mask, cache=cache, segments=segments))

    def hidden(self, input_ids, mask=None, cache=None, segments=None):
        """The final hidden states [B, T, hidden] (model() without the LM head)."""
        if segments is not None:
            if cache is not None or mask is not None:
                raise ValueError("model: segments (packed rows) go without a cache or a mask")
            if tuple(segments.shape) != tuple(input_ids.shape):
                raise ValueError(f"model: segments must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(segments.shape)}")
        if cache is not None:
            expected = [CACHES[t] for t in self.args.layer_types]
            if len(cache) != len(expected) or any(type(c) is not e for c, e in zip(cache, expected)):
                raise ValueError("model: the cache does not belong to this model (make it with "
                                 "model.make_cache())")
        return self.model(input_ids, mask=mask, cache=cache, segments=segments)

    def head_module(self):
        """The module whose weights make the logits: the embeddings when tied, else lm_head."""
        return self.model.embeddings if self.args.tie_word_embeddings else self.lm_head

    def head(self, h):
        """Logits [..., vocab] of hidden states h."""
        if self.args.tie_word_embeddings:
            return self.model.embeddings.as_linear(h)
        return self.lm_head(h)

    def make_cache(self):
        return [CACHES[t]() for t in self.args.layer_types]


# Presets. The paper's sizes as NVlabs' lit_gpt builds them: every GDN layer is
# GatedDeltaNet(hidden_size) with its defaults (9 heads, expand_k 0.75, expand_v 1.5: head_dim =
# 0.75 h / 9, our expand_v 2), n_head only for the attention layers of H1 (GDN on even layers,
# SWA window 2048 on odd ones), norm eps 1e-5, tied embeddings, vocab 32000. Tiny ones for tests.
_NV = dict(num_heads=9, expand_v=2, norm_eps=1e-5, tie_word_embeddings=True, window_size=2048)
PRESETS = {
    "tiny-gdn": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, head_dim=16, num_heads=2,
                     expand_v=2, hidden_ratio=2),
    # small, with the paper's head shape (K = 128, V = 256): where the op's cost shows in a model
    "small-gdn": dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, head_dim=128, num_heads=2,
                      expand_v=2, hidden_ratio=2),
    "tiny-h1": dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, head_dim=16, num_heads=2,
                    expand_v=2, hidden_ratio=2, layer_types=["gdn", "swa"] * 2, attn_num_heads=4,
                    window_size=32),
    "gdn-0.4b": dict(_NV, hidden_size=1536, num_hidden_layers=11, head_dim=128, intermediate_size=6144),
    "gdn-1.3b": dict(_NV, hidden_size=2400, num_hidden_layers=16, head_dim=200, intermediate_size=5888),
    "h1-0.4b": dict(_NV, hidden_size=1536, num_hidden_layers=12, head_dim=128, intermediate_size=6144,
                    layer_types=["gdn", "swa"] * 6, attn_num_heads=12),
    "h1-1.3b": dict(_NV, hidden_size=2304, num_hidden_layers=18, head_dim=192, intermediate_size=6144,
                    layer_types=["gdn", "swa"] * 9, attn_num_heads=18),
    # H2 (no released code): Mamba2 -> GDN -> SWA repeating, on the H1 sizes
    "h2-0.4b": dict(_NV, hidden_size=1536, num_hidden_layers=12, head_dim=128, intermediate_size=6144,
                    layer_types=["mamba2", "gdn", "swa"] * 4, attn_num_heads=12),
    "h2-1.3b": dict(_NV, hidden_size=2304, num_hidden_layers=18, head_dim=192, intermediate_size=6144,
                    layer_types=["mamba2", "gdn", "swa"] * 6, attn_num_heads=18),
}


def from_preset(name: str) -> Model:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return Model(ModelArgs(**PRESETS[name]))
