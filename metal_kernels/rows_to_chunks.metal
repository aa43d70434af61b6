// Token rows to the chunk-major layout of chunk.py, optionally L2-normalised and scaled:
// y[(n * B + b), hv, c, :] = x[b, src[n * C + c], hv / (HV / HX), :] * mul, zeros where src is -1
// (the padding that ends each sequence at a multiple of C), with mul = scale, or scale / |x row| with
// L2NORM (rsqrt(sum x^2 + 1e-6), as ops.l2_normalize). This is the forward's input layout (q, k, v)
// and the backward's cotangent of the output (do).
// Grid (32 * NC * B * HV, 1, 1), threadgroup (32 * rows, 1, 1): one SIMD group per output row
// (p, b, hv), hv fastest; lane l holds columns l + 32 j.
// Template: InT, OutT (float, or InT where nothing is lost: v, and k without the L2 norm), D, HX
// (heads of x), HV (output heads, a multiple of HX), C, L2NORM. The sizes that
// change from call to call come in `dims` (no new kernel for each sequence length).
// Inputs: x [B,T,HX,D] InT; src [NC] int32 (the token at padded position p, or -1; NC a multiple of
// C); scale [1] float32; dims [3] int32: T, B, NC.
// Output: y [NC / C * B, HV, C, D] OutT.
constexpr int ND = (D + 31) / 32;
const uint T = dims[0], B = dims[1], NC = dims[2];
const uint lane = thread_index_in_simdgroup;
const uint row = thread_position_in_grid.x / 32;
if (row >= NC * B * HV) {
  return;  // a whole SIMD group: the row is the same for its 32 lanes
}
const uint hv = row % HV;
const uint b = row / HV % B;
const uint p = row / (HV * B);
const int t = src[p];
const uint x_at = ((b * T + (t < 0 ? 0 : t)) * HX + hv / (HV / HX)) * D;
const uint y_at = (((p / C * B + b) * HV + hv) * C + p % C) * D;
float xv[ND];
float ss = 0.0f;
for (int j = 0; j < ND; ++j) {
  const uint d = lane + 32 * j;
  xv[j] = t >= 0 && d < D ? static_cast<float>(x[x_at + d]) : 0.0f;
  ss += xv[j] * xv[j];
}
float mul = scale[0];
if (L2NORM) {
  mul = rsqrt(simd_sum(ss) + 1e-6f) * scale[0];
}
for (int j = 0; j < ND; ++j) {
  const uint d = lane + 32 * j;
  if (d < D) {
    y[y_at + d] = static_cast<OutT>(xv[j] * mul);
  }
}
