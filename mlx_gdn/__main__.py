"""`python -m mlx_gdn`: a one-minute self-check of the gated delta rule on this machine.

Runs the chunked path and the token-by-token reference on the same random inputs (fla's conventions,
in-kernel L2 norm and gate), reports how closely they agree and how long each took.
"""

import argparse
import time

import mlx.core as mx

from .ops import gated_delta_rule


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512, help="tokens (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="heads (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64, help="key and value head size (default: %(default)s)")
    args = parser.parse_args(argv)
    T, H, D = args.seq_len, args.heads, args.head_dim
    mx.random.seed(0)
    q, k = mx.random.normal((2, 1, T, H, D))
    v = mx.random.normal((1, T, H, D))
    a, b = mx.random.normal((2, 1, T, H))
    A_log = mx.log(mx.random.uniform(1, 16, (H,)))
    opts = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                use_beta_sigmoid_in_kernel=True, output_final_state=True)
    results = {}
    for mode in ("chunk", "recurrent"):
        start = time.perf_counter()
        o, state = gated_delta_rule(q, k, v, a, b, mode=mode, **opts)
        mx.eval(o, state)
        results[mode] = (o, state, time.perf_counter() - start)
    (oc, sc, tc), (orr, sr, tr) = results["chunk"], results["recurrent"]
    def rms_rel(ref, x):
        return (mx.sqrt(mx.sum((x - ref) ** 2)) / mx.sqrt(mx.sum(ref ** 2))).item()

    rel, rel_state = rms_rel(orr, oc), rms_rel(sr, sc)
    print(f"mlx_gdn on {mx.default_device()}: (B, T, H, D) = (1, {T}, {H}, {D}), float32")
    print(f"  chunk     {tc * 1e3:8.1f} ms")
    print(f"  recurrent {tr * 1e3:8.1f} ms")
    print(f"  chunk vs recurrent: RMS-relative difference {rel:.2e} (outputs), {rel_state:.2e} (state)")
    if not max(rel, rel_state) < 1e-4:
        raise SystemExit("chunked and recurrent paths disagree")


if __name__ == "__main__":
    main()
