// Metal prelude for the kernel bodies in this folder. The bodies are written in the Metal subset that
// the CUDA prelude (prelude_cuda.h) and the CPU emulator's shim (tests/emulator/shim.h) also define:
//   thread_position_in_grid / _in_threadgroup, threadgroup_position_in_grid, threads_per_threadgroup
//   (uint3), thread_index_in_simdgroup, simdgroup_index_in_threadgroup (uint);
//   `threadgroup T name[N];` declarations; threadgroup_barrier(mem_flags::mem_threadgroup);
//   simd_sum(float), called by all 32 lanes of a SIMD group; exp, log, rsqrt on float;
//   static_cast between float and the input type (float, bfloat16_t, half); int/uint arithmetic.
// Metal has all of these natively, so nothing needs defining here.
