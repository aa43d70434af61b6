// Token rows to the chunk-major layout of chunk.py, optionally L2-normalised and scaled:
// y[(n * B + b), hv, c, :] = x[b, src[n * C + c], hv / (HV / HX), :] * mul, zeros where src is -1
// (the padding that ends each sequence at a multiple of C), with mul = scale, or scale / |x row| with
// L2NORM (rsqrt(sum x^2 + 1e-6), as ops.l2_normalize). This is the forward's input layout (q, k, v)
// and the backward's cotangent of the output (do).
// Grid (32 * ceil(NC * B * HV / RPS), 1, 1), threadgroup (32 * groups, 1, 1): a SIMD group takes RPS
// output rows (p, b, hv), hv fastest, their loads all issued before the first sum (one row's 256
// bytes a SIMD group in flight left the kernel at 55% of the H100's bandwidth, fla's l2norm at 86%).
// Where D is a multiple of 8, lane l holds columns 8 (l + 32 j) + 0..7 (gdn_load_vec8: one 16-byte
// load); else columns l + 32 j.
// Template: InT, OutT (float, or InT where nothing is lost: v, and k without the L2 norm), D, HX
// (heads of x), HV (output heads, a multiple of HX), C, L2NORM, RPS. The sizes that change from call
// to call come in `dims` (no new kernel for each sequence length).
// Inputs: x [B,T,HX,D] InT; src [NC] int32 (the token at padded position p, or -1; NC a multiple of
// C); scale [1] float32; dims [3] int32: T, B, NC.
// Output: y [NC / C * B, HV, C, D] OutT.
constexpr bool VEC = D % 8 == 0;
constexpr int NJ = VEC ? (D / 8 + 31) / 32 : (D + 31) / 32;  // a lane's vectors (VEC) or columns
const uint T = dims[0], B = dims[1], NC = dims[2];
const uint lane = thread_index_in_simdgroup;
const uint first = thread_position_in_grid.x / 32 * RPS;  // the same for the 32 lanes
gdn_vec8<InT> xv8[VEC ? RPS : 1][VEC ? NJ : 1];
float xv[VEC ? 1 : RPS][VEC ? 1 : NJ];
int t[RPS];
uint y_at[RPS];
#pragma unroll
for (int r = 0; r < RPS; ++r) {
  const uint row = first + r;
  const uint hv = row % HV, b = row / HV % B, p = row / (HV * B);
  t[r] = row < NC * B * HV ? src[p] : -2;  // -2: past the last row (nothing written)
  const uint x_at = ((b * T + (t[r] < 0 ? 0 : t[r])) * HX + hv / (HV / HX)) * D;
  y_at[r] = (((p / C * B + b) * HV + hv) * C + p % C) * D;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    if (VEC) {
      const uint d = 8 * (lane + 32 * j);
      if (t[r] >= 0 && d < D) {
        xv8[r][j] = gdn_load_vec8(&x[x_at + d]);
      }
    } else {
      const uint d = lane + 32 * j;
      xv[r][j] = t[r] >= 0 && d < D ? static_cast<float>(x[x_at + d]) : 0.0f;
    }
  }
}
#pragma unroll
for (int r = 0; r < RPS; ++r) {
  if (t[r] == -2) {
    break;  // this and the rows after it are past the end (the same for the 32 lanes)
  }
  float xs[VEC ? 8 * NJ : NJ];  // the lane's values of row r (zeros outside)
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    if (VEC) {
      const bool inside = t[r] >= 0 && 8 * (lane + 32 * j) < D;
      for (int i = 0; i < 8; ++i) {
        xs[8 * j + i] = inside ? xv8[VEC ? r : 0][VEC ? j : 0].get(i) : 0.0f;
        ss += xs[8 * j + i] * xs[8 * j + i];
      }
    } else {
      xs[j] = xv[VEC ? 0 : r][VEC ? 0 : j];
      ss += xs[j] * xs[j];
    }
  }
  float mul = scale[0];
  if (L2NORM) {
    mul = rsqrt(simd_sum(ss) + 1e-6f) * scale[0];
  }
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    if (VEC) {
      const uint d = 8 * (lane + 32 * j);
      if (d < D) {
        float out[8];
        for (int i = 0; i < 8; ++i) {
          out[i] = xs[8 * j + i] * mul;
        }
        gdn_store_vec8(&y[y_at[r] + d], out);
      }
    } else {
      const uint d = lane + 32 * j;
      if (d < D) {
        y[y_at[r] + d] = static_cast<OutT>(xs[j] * mul);
      }
    }
  }
}
