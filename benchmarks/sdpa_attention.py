"""A stand-in for flash-attn's `flash_attn_func` on PyTorch's scaled_dot_product_attention, so fla's
hybrid models (GDN + sliding-window attention) run where flash-attn cannot be installed (the device
machine has no network and no flash-attn wheel). Only what fla's `Attention` layer calls without
padding or cu_seqlens: causal, with or without a left window, no dropout.

A window shorter than T runs in query blocks of one window, each against the keys it can see (a
block of queries sees at most two windows of keys), so the work stays about T * window, as
flash-attn's does; inside a block a banded mask selects the pairs (PyTorch then takes its
memory-efficient kernel, not the flash one: slower than flash-attn on the same work).

    import fla.layers.attn, sdpa_attention
    fla.layers.attn.flash_attn_func = sdpa_attention.flash_attn_func
"""

import torch
import torch.nn.functional as F


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    **unsupported):
    """q [B, T, H, D], k, v [B, T, HK, D] (H a multiple of HK) -> [B, T, H, D], as flash-attn's."""
    if dropout_p or not causal or window_size[1] not in (0, -1) or q.shape[1] != k.shape[1] or any(
            unsupported.values()):
        raise NotImplementedError("sdpa_attention: only causal attention without dropout, q and k of "
                                  "one length, an optional left window")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, T, D]
    gqa = kh.shape[1] != qh.shape[1]
    T, left = qh.shape[2], window_size[0]
    if left < 0 or left + 1 >= T:  # the window covers every earlier token: plain causal
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
        return o.transpose(1, 2)
    outs = []
    for q0 in range(0, T, left + 1):
        q1, k0 = min(T, q0 + left + 1), max(0, q0 - left)
        i = torch.arange(q0, q1, device=q.device)[:, None]
        j = torch.arange(k0, q1, device=q.device)[None, :]
        visible = (j <= i) & (j >= i - left)
        outs.append(F.scaled_dot_product_attention(qh[:, :, q0:q1], kh[:, :, k0:q1], vh[:, :, k0:q1],
                                                   attn_mask=visible, scale=softmax_scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2)
