// Chunk scan, backward: the reverse dh scan of the chunked gated delta rule.
//   du_n = PdO_n + Kt_n dh_{n+1};   dh_n = decay_n dh_{n+1} + QdO_n - W_n^T du_n
// (dh_{n+1} restarts from dh_final at a segment's last chunk; dh0 is dh at its first chunk.)
// Grid (32, V, R), threadgroup (32, TG_V, 1): one SIMD group per (row, value column dv), the column
// dh[:, dv] in registers (lane holds k = lane + 32 j), float32 throughout.
// Template: K, V, C, N (chunks), R.
// Inputs: PdO [N,R,C,V]; QdO [N,R,K,V]; Kt, W [N,R,C,K]; decay [N,R]; dh_final [S*R,K,V];
// seg_first, seg_last [N] int32.
// Outputs: du [N,R,C,V]; dh_next [N,R,K,V] (dh_{n+1}, the gradient leaving chunk n); dh0 [S*R,K,V].
constexpr int NK = (K + 31) / 32;
constexpr int ROWS = 8;  // chunk rows per step (C is 16, 32 or 64)
const uint lane = thread_position_in_threadgroup.x;
const uint dv = thread_position_in_grid.y;
const uint r = thread_position_in_grid.z;
if (dv >= V) {
  return;  // a whole SIMD group: no SIMD op is skipped by part of it
}
float dh[NK];
float dh_prev[NK];
for (int j = 0; j < NK; ++j) {
  dh[j] = 0.0f;
}
for (int n = N - 1; n >= 0; --n) {
  const uint nr = n * R + r;
  if (seg_last[n] >= 0) {
    for (int j = 0; j < NK; ++j) {
      const uint kk = lane + 32 * j;
      dh[j] = kk < K ? dh_final[((seg_last[n] * R + r) * K + kk) * V + dv] : 0.0f;
    }
  }
  const float d = decay[nr];
  for (int j = 0; j < NK; ++j) {
    const uint kk = lane + 32 * j;
    if (kk < K) {
      dh_next[(nr * K + kk) * V + dv] = dh[j];
      dh_prev[j] = d * dh[j] + QdO[(nr * K + kk) * V + dv];
    } else {
      dh_prev[j] = 0.0f;
    }
  }
  // Every row's du_c = PdO_c + Kt_c dh reads the same dh: ROWS rows at a time give independent loads
  // and SIMD reductions in flight instead of one dependent chain per row.
  for (int c0 = 0; c0 < C; c0 += ROWS) {
    float du_c[ROWS];
    for (int i = 0; i < ROWS; ++i) {
      const uint ck = (nr * C + c0 + i) * K;
      float kdh = 0.0f;
      for (int j = 0; j < NK; ++j) {
        const uint kk = lane + 32 * j;
        kdh += kk < K ? Kt[ck + kk] * dh[j] : 0.0f;
      }
      du_c[i] = kdh;
    }
    for (int i = 0; i < ROWS; ++i) {
      du_c[i] = PdO[(nr * C + c0 + i) * V + dv] + simd_sum(du_c[i]);
    }
    for (int i = 0; i < ROWS; ++i) {
      const uint ck = (nr * C + c0 + i) * K;
      if (lane == 0) {
        du[(nr * C + c0 + i) * V + dv] = du_c[i];
      }
      for (int j = 0; j < NK; ++j) {
        const uint kk = lane + 32 * j;
        dh_prev[j] -= kk < K ? W[ck + kk] * du_c[i] : 0.0f;
      }
    }
  }
  for (int j = 0; j < NK; ++j) {
    dh[j] = dh_prev[j];
  }
  if (seg_first[n] >= 0) {
    for (int j = 0; j < NK; ++j) {
      const uint kk = lane + 32 * j;
      if (kk < K) {
        dh0[((seg_first[n] * R + r) * K + kk) * V + dv] = dh[j];
      }
    }
  }
}
