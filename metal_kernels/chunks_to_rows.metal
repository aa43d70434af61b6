// Chunk-major rows back to token rows, the inverse layout of rows_to_chunks.metal and its
// VJP: out[b, t, hx, :] = mul * sum over the HV / HX heads hv of head hx of y[(n * B + b), hv, c, :]
// with n * C + c = dst[t] (the token's padded position). Plain (mul = scale) it is the forward's
// output layout and the cotangent of v; with L2NORM it is the VJP of the L2 norm and scale applied
// to the raw rows x: out = scale * (r s - r^3 (x . s) x), r = rsqrt(sum x^2 + 1e-6), s the head sum.
// Grid (32 * B * T * HX, 1, 1), threadgroup (32 * rows, 1, 1): one SIMD group per output row
// (b, t, hx), hx fastest; lane l holds columns l + 32 j.
// Template: OutT, XT, D, HX, HV (a multiple of HX), C, L2NORM. The sizes that change from call to
// call come in `dims` (no new kernel for each sequence length).
// Inputs: y [N * B, HV, C, D] (float32, or the output's type from chunk_output.metal); x [B,T,HX,D] XT (read with L2NORM only); dst [T] int32;
// scale [1] float32; dims [2] int32: T, B. Output: out [B,T,HX,D] OutT.
constexpr int ND = (D + 31) / 32;
constexpr int G = HV / HX;
const uint T = dims[0], B = dims[1];
const uint lane = thread_index_in_simdgroup;
const uint row = thread_position_in_grid.x / 32;
if (row >= B * T * HX) {
  return;  // a whole SIMD group: the row is the same for its 32 lanes
}
const uint hx = row % HX;
const uint bt = row / HX;  // b * T + t
const uint b = bt / T;
const int p = dst[bt % T];
float s[ND];
for (int j = 0; j < ND; ++j) {
  s[j] = 0.0f;
}
for (int i = 0; i < G; ++i) {
  const uint y_at = (((p / C * B + b) * HV + hx * G + i) * C + p % C) * D;
  for (int j = 0; j < ND; ++j) {
    const uint d = lane + 32 * j;
    s[j] += d < D ? static_cast<float>(y[y_at + d]) : 0.0f;
  }
}
const float mul = scale[0];
if (L2NORM) {
  float xv[ND];
  float ss = 0.0f;
  float xs = 0.0f;
  for (int j = 0; j < ND; ++j) {
    const uint d = lane + 32 * j;
    xv[j] = d < D ? static_cast<float>(x[row * D + d]) : 0.0f;
    ss += xv[j] * xv[j];
    xs += xv[j] * s[j];
  }
  const float r = rsqrt(simd_sum(ss) + 1e-6f);
  const float r3xs = r * r * r * simd_sum(xs);
  for (int j = 0; j < ND; ++j) {
    s[j] = r * s[j] - r3xs * xv[j];
  }
}
for (int j = 0; j < ND; ++j) {
  const uint d = lane + 32 * j;
  if (d < D) {
    out[row * D + d] = static_cast<OutT>(s[j] * mul);
  }
}
