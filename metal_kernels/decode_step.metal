// Decode step: a few tokens of the gated delta rule with the state in registers, fully fused:
// q/k L2 norm, gate from (A_log, dt_bias), beta sigmoid, delta update and read-out.
//
// Grid (32, V, B*HV), threadgroup (32, TG_V, 1): one SIMD group per (row, value column dv); each lane
// holds state[k][dv] for k = lane + 32 j. Template: InT (q/k/v's type), GateT and BetaT (g's and
// beta's: the signature types each buffer, and these put the types in the compiled kernel's name),
// K, V, HQ (q/k heads), HV, T (tokens), L2NORM, GATE, HAS_DT_BIAS, BETA_SIGMOID, NEG_EIGVAL.
// Inputs: q, k [B,T,HQ,K]; v [B,T,HV,V]; g [B,T,HV] GateT; beta [B,T,HV] BetaT; A_log, dt_bias [HV]
// float32; scale [1];
// state_in [B,HV,K,V] float32. Outputs: o [B,T,HV,V] InT; state_out [B,HV,K,V] float32.
constexpr int NK = (K + 31) / 32;
const uint lane = thread_position_in_threadgroup.x;
const uint dv = thread_position_in_grid.y;
const uint row = thread_position_in_grid.z;
if (dv >= V) {
  return;  // a whole SIMD group (all lanes share dv): no barrier or SIMD op is skipped by part of it
}
const uint b = row / HV;
const uint hv = row % HV;
const uint hq = hv / (HV / HQ);
const float qk_scale = scale[0];

float state[NK];
for (int j = 0; j < NK; ++j) {
  const uint kk = lane + 32 * j;
  state[j] = kk < K ? state_in[(row * K + kk) * V + dv] : 0.0f;
}
for (int t = 0; t < T; ++t) {
  const uint qk_base = ((b * T + t) * HQ + hq) * K;
  const uint gate_at = (b * T + t) * HV + hv;
  float qv[NK];
  float kv[NK];
  float qq = 0.0f;
  float kn = 0.0f;
  for (int j = 0; j < NK; ++j) {
    const uint kk = lane + 32 * j;
    qv[j] = kk < K ? static_cast<float>(q[qk_base + kk]) : 0.0f;
    kv[j] = kk < K ? static_cast<float>(k[qk_base + kk]) : 0.0f;
    qq += qv[j] * qv[j];
    kn += kv[j] * kv[j];
  }
  float q_mul = qk_scale;
  float k_mul = 1.0f;
  if (L2NORM) {
    q_mul *= rsqrt(simd_sum(qq) + 1e-6f);
    k_mul = rsqrt(simd_sum(kn) + 1e-6f);
  }
  float gv = static_cast<float>(g[gate_at]);
  if (GATE) {
    const float x = HAS_DT_BIAS ? gv + static_cast<float>(dt_bias[hv]) : gv;
    const float softplus = x > 20.0f ? x : log(1.0f + exp(x));
    gv = -exp(static_cast<float>(A_log[hv])) * softplus;
  }
  const float decay = exp(gv);
  float bv = static_cast<float>(beta[gate_at]);
  if (BETA_SIGMOID) {
    bv = 1.0f / (1.0f + exp(-bv));
  }
  if (NEG_EIGVAL) {
    bv *= 2.0f;
  }
  float recalled = 0.0f;
  for (int j = 0; j < NK; ++j) {
    kv[j] *= k_mul;
    state[j] *= decay;
    recalled += state[j] * kv[j];
  }
  recalled = simd_sum(recalled);
  const uint v_at = ((b * T + t) * HV + hv) * V + dv;
  const float u = bv * (static_cast<float>(v[v_at]) - recalled);
  float out = 0.0f;
  for (int j = 0; j < NK; ++j) {
    state[j] += kv[j] * u;
    out += state[j] * qv[j] * q_mul;
  }
  out = simd_sum(out);
  if (lane == 0) {
    o[v_at] = static_cast<InT>(out);
  }
}
for (int j = 0; j < NK; ++j) {
  const uint kk = lane + 32 * j;
  if (kk < K) {
    state_out[(row * K + kk) * V + dv] = state[j];
  }
}
