// Metal prelude for the kernel bodies in this folder. The bodies are written in the Metal subset that
// the CUDA prelude (prelude_cuda.h) and the CPU emulator's shim (tests/emulator/shim.h) also define:
//   thread_position_in_grid / _in_threadgroup, threadgroup_position_in_grid, threads_per_threadgroup
//   (uint3), thread_index_in_simdgroup, simdgroup_index_in_threadgroup (uint);
//   `threadgroup T name[N];` declarations; threadgroup_barrier(mem_flags::mem_threadgroup), or with
//   mem_flags::mem_device | mem_flags::mem_threadgroup where threads read device memory others wrote;
//   float4 as a plain record: threadgroup arrays and locals of it, whole copies, .x .y .z .w,
//   built by make_float4(x, y, z, w) (CUDA's own; defined below for Metal);
//   simd_sum(float), called by all 32 lanes of a SIMD group; exp, log, rsqrt on float;
//   static_cast between float and the input type (float, bfloat16_t, half); int/uint arithmetic;
//   `const auto p = buffer + offset;` (a pointer into a buffer, its address space deduced);
//   simdgroup_float8x8 with make_filled_simdgroup_matrix<float, 8, 8>(v),
//   simdgroup_load(m, threadgroup pointer, row stride), simdgroup_store(m, pointer, row stride) and
//   simdgroup_load_transposed / simdgroup_store_transposed(m, pointer, row stride) (the transpose of
//   the 8x8 block there) on float pointers (device memory of bfloat16_t or half: the CUDA prelude
//   and the emulator only, which the launchers respect: kernels.forward_types keeps float on Metal),
//   and simdgroup_multiply_accumulate(d, a, b, c), called by all 32 lanes; a
//   product may be accumulated into and used as a left factor, but is stored and loaded again before
//   it is used as a right factor;
//   simdgroup_multiply_accumulate_pair(d, d2, a, a2, b): d += a b and d2 += a2 b (two 8x8 products
//   with one right factor, which a prelude may run as one 16 x 8 x 8 product);
//   simdgroup_multiply_accumulate_exact(d, a, b, c): a product at float precision or better even in
//   a kernel whose other products round their factors to bfloat16 (CUDA's BF16 mode).
//   simdgroup_scale_columns(m, threadgroup float pointer, thread_index_in_simdgroup): column j of m
//   times scale[j], in the lanes that hold it (no store and load);
//   gdn_vec8<T> (8 contiguous elements of a device array as loaded, .get(j) as float), from
//   gdn_load_vec8(device pointer), and gdn_store_vec8(device pointer, 8 floats) (CUDA: one or two
//   16-byte accesses where the pointer is 16-byte aligned);
// Metal has all of these natively but make_float4, the pair, the exact product (Metal's products
// are float), the column scaling, the vec8 loads and the transposed names; the SIMD-group matrix
// header needs including.
#include <metal_simdgroup_matrix>
inline float4 make_float4(float x, float y, float z, float w) { return float4(x, y, z, w); }
inline void simdgroup_multiply_accumulate_pair(thread simdgroup_float8x8& d, thread simdgroup_float8x8& d2,
                                               const thread simdgroup_float8x8& a,
                                               const thread simdgroup_float8x8& a2,
                                               const thread simdgroup_float8x8& b) {
  simdgroup_multiply_accumulate(d, a, b, d);
  simdgroup_multiply_accumulate(d2, a2, b, d2);
}
inline void simdgroup_multiply_accumulate_exact(thread simdgroup_float8x8& d, const thread simdgroup_float8x8& a,
                                                const thread simdgroup_float8x8& b,
                                                const thread simdgroup_float8x8& c) {
  simdgroup_multiply_accumulate(d, a, b, c);
}
template <typename P>
inline void simdgroup_load_transposed(thread simdgroup_float8x8& m, P src, ulong stride) {
  simdgroup_load(m, src, stride, ulong2(0, 0), true);
}
template <typename P>
inline void simdgroup_store_transposed(const thread simdgroup_float8x8& m, P dst, ulong stride) {
  simdgroup_store(m, dst, stride, ulong2(0, 0), true);
}
// A lane's two elements of an 8x8 matrix are row (q & 4) + (lane / 2) % 4, columns c and c + 1 with
// c = (q & 2) * 2 + (lane % 2) * 2, q = lane / 4: the layout MLX's own GEMMs (steel's BaseMMAFrag)
// rely on.
inline void simdgroup_scale_columns(thread simdgroup_float8x8& m, const threadgroup float* scale, uint lane) {
  const uint c = ((lane / 4) & 2) * 2 + (lane % 2) * 2;
  m.thread_elements()[0] *= scale[c];
  m.thread_elements()[1] *= scale[c + 1];
}
template <typename T>
struct gdn_vec8 {
  T e[8];
  float get(int j) const { return static_cast<float>(e[j]); }
};
template <typename T>
inline gdn_vec8<T> gdn_load_vec8(const device T* p) {
  gdn_vec8<T> v;
  for (int j = 0; j < 8; ++j) {
    v.e[j] = p[j];
  }
  return v;
}
template <typename T>
inline void gdn_store_vec8(device T* p, const thread float* x) {
  for (int j = 0; j < 8; ++j) {
    p[j] = static_cast<T>(x[j]);
  }
}
