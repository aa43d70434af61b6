"""Which state layout fla 0.6.0's fused_recurrent_gated_delta_rule uses (device diagnostic)."""
import sys

import numpy as np
import torch
import fla.ops.gated_delta_rule as fla_ops

sys.path.insert(0, "tests")
from reference import gated_delta_reference, make_inputs, rms_rel  # noqa: E402

data = make_inputs(8, 2, 3, 2, 2, 64, h0=True, unit_k=False)
ro, rs = gated_delta_reference(**data, use_qk_l2norm_in_kernel=True)
t = {n: torch.tensor(x, device="cuda") for n, x in data.items()}
for layout, h0 in (("K-first", t["initial_state"]), ("V-first", t["initial_state"].transpose(-1, -2).contiguous())):
    for name, fn in (("fused_recurrent", fla_ops.fused_recurrent_gated_delta_rule),
                     ("chunk", fla_ops.chunk_gated_delta_rule)):
        o, s = fn(t["q"], t["k"], t["v"], g=t["g"], beta=t["beta"], initial_state=h0, output_final_state=True,
                  use_qk_l2norm_in_kernel=True)
        s = s.cpu().numpy()
        print(f"{name:16s} h0 {layout}: o {rms_rel(ro, o.cpu().numpy()):.2e}  "
              f"state(K-first) {rms_rel(rs, s):.2e}  state(V-first) {rms_rel(rs, np.swapaxes(s, -1, -2)):.2e}")
