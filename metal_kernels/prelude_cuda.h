// CUDA prelude: maps the Metal built-ins the kernel bodies use onto CUDA, for mx.fast.cuda_kernel.
// Grid semantics match MLX's: the grid counts threads, blocks = ceil(grid / threadgroup).
typedef unsigned int uint;

#define thread_position_in_grid                                   \
  make_uint3(blockIdx.x * blockDim.x + threadIdx.x,               \
             blockIdx.y * blockDim.y + threadIdx.y,               \
             blockIdx.z * blockDim.z + threadIdx.z)
#define thread_position_in_threadgroup threadIdx
#define threadgroup_position_in_grid blockIdx
#define threads_per_threadgroup blockDim
#define gdn_linear_thread_index \
  (threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y)
#define thread_index_in_simdgroup (gdn_linear_thread_index & 31u)
#define simdgroup_index_in_threadgroup (gdn_linear_thread_index >> 5)

#define threadgroup __shared__
namespace mem_flags {
constexpr int mem_none = 0;
constexpr int mem_device = 1;
constexpr int mem_threadgroup = 2;
}  // namespace mem_flags
#define threadgroup_barrier(flags) __syncthreads()

__device__ inline float simd_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}
#define rsqrt(x) rsqrtf(x)
