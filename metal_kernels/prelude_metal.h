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
// Metal has all of these natively but make_float4, the pair, the exact product (Metal's products
// are float) and the transposed names; the SIMD-group matrix header needs including.
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
