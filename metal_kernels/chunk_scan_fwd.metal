// Chunk scan, forward: the sequential part of the chunked gated delta rule.
//   u_n = U_n - W_n h_n;   h_{n+1} = decay_n h_n + Kt_n^T u_n   (restarting from h0 at segment starts)
// Grid (32, V, R), threadgroup (32, TG_V, 1), R = B*HV rows: one SIMD group per (row, value column dv),
// the column h[:, dv] in registers (lane holds k = lane + 32 j), float32 throughout.
// Template: K, V, C, N (chunks), R.
// Inputs: W, Kt [N,R,C,K]; U [N,R,C,V]; decay [N,R]; h0 [S*R,K,V]; seg_first, seg_last [N] int32
// (segment index starting / ending at chunk n, or -1).
// Outputs: states [N,R,K,V] (h_n, the state entering chunk n); v_new [N,R,C,V]; h_final [S*R,K,V].
constexpr int NK = (K + 31) / 32;
constexpr int ROWS = 8;  // chunk rows per step (C is 16, 32 or 64)
const uint lane = thread_position_in_threadgroup.x;
const uint dv = thread_position_in_grid.y;
const uint r = thread_position_in_grid.z;
if (dv >= V) {
  return;  // a whole SIMD group: no SIMD op is skipped by part of it
}
float h[NK];
float h_next[NK];
for (int j = 0; j < NK; ++j) {
  h[j] = 0.0f;
}
for (int n = 0; n < N; ++n) {
  const uint nr = n * R + r;
  if (seg_first[n] >= 0) {
    for (int j = 0; j < NK; ++j) {
      const uint kk = lane + 32 * j;
      h[j] = kk < K ? h0[((seg_first[n] * R + r) * K + kk) * V + dv] : 0.0f;
    }
  }
  const float d = decay[nr];
  for (int j = 0; j < NK; ++j) {
    const uint kk = lane + 32 * j;
    if (kk < K) {
      states[(nr * K + kk) * V + dv] = h[j];
    }
    h_next[j] = d * h[j];
  }
  // Every row's u_c = U_c - W_c h reads the same h: ROWS rows at a time give independent loads and
  // SIMD reductions in flight instead of one dependent chain per row.
  for (int c0 = 0; c0 < C; c0 += ROWS) {
    float u[ROWS];
    for (int i = 0; i < ROWS; ++i) {
      const uint ck = (nr * C + c0 + i) * K;
      float wh = 0.0f;
      for (int j = 0; j < NK; ++j) {
        const uint kk = lane + 32 * j;
        wh += kk < K ? W[ck + kk] * h[j] : 0.0f;
      }
      u[i] = wh;
    }
    for (int i = 0; i < ROWS; ++i) {
      u[i] = U[(nr * C + c0 + i) * V + dv] - simd_sum(u[i]);
    }
    for (int i = 0; i < ROWS; ++i) {
      const uint ck = (nr * C + c0 + i) * K;
      if (lane == 0) {
        v_new[(nr * C + c0 + i) * V + dv] = u[i];
      }
      for (int j = 0; j < NK; ++j) {
        const uint kk = lane + 32 * j;
        h_next[j] += kk < K ? Kt[ck + kk] * u[i] : 0.0f;
      }
    }
  }
  for (int j = 0; j < NK; ++j) {
    h[j] = h_next[j];
  }
  if (seg_last[n] >= 0) {
    for (int j = 0; j < NK; ++j) {
      const uint kk = lane + 32 * j;
      if (kk < K) {
        h_final[((seg_last[n] * R + r) * K + kk) * V + dv] = h[j];
      }
    }
  }
}
