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

// SIMD-group 8x8 float matrices (Metal's simdgroup_float8x8) on FP64 tensor cores: one 8x8x8
// product is two mma.m8n8k4.f64, exact products and sums rounded once to float at the store. A lane
// keeps the elements it feeds in each operand role (g = lane / 4, t = lane % 4): as the left factor
// row g, columns t and t + 4; as the right factor rows t and t + 4, column g; as the accumulator row
// g, columns 2t and 2t + 1. simdgroup_load fills all three and the compiler drops the roles a
// matrix never plays. A product is only ever an accumulator here: to use it as a factor, store it
// and load it again (the emulator rejects a product passed as a factor).
struct simdgroup_float8x8 {
  float a[2], b[2];
  double c[2];
};

template <typename T, int Cols, int Rows>
__device__ inline simdgroup_float8x8 make_filled_simdgroup_matrix(T value) {
  simdgroup_float8x8 m;
  m.a[0] = m.a[1] = m.b[0] = m.b[1] = value;
  m.c[0] = m.c[1] = value;
  return m;
}

__device__ inline void simdgroup_load(simdgroup_float8x8& m, const float* src, unsigned long stride) {
  const uint g = thread_index_in_simdgroup >> 2, t = thread_index_in_simdgroup & 3u;
  m.a[0] = src[g * stride + t];
  m.a[1] = src[g * stride + t + 4];
  m.b[0] = src[t * stride + g];
  m.b[1] = src[(t + 4) * stride + g];
  m.c[0] = src[g * stride + 2 * t];
  m.c[1] = src[g * stride + 2 * t + 1];
}

__device__ inline void simdgroup_store(const simdgroup_float8x8& m, float* dst, unsigned long stride) {
  const uint g = thread_index_in_simdgroup >> 2, t = thread_index_in_simdgroup & 3u;
  dst[g * stride + 2 * t] = (float)m.c[0];
  dst[g * stride + 2 * t + 1] = (float)m.c[1];
}

__device__ inline void simdgroup_multiply_accumulate(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                                     const simdgroup_float8x8& b,
                                                     const simdgroup_float8x8& c) {
  double d0 = c.c[0], d1 = c.c[1];
  for (int half = 0; half < 2; ++half) {
    asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
        : "+d"(d0), "+d"(d1)
        : "d"((double)a.a[half]), "d"((double)b.b[half]));
  }
  d.c[0] = d0;
  d.c[1] = d1;
}

// d += a b and d2 += a2 b (Metal's prelude defines the same pair).
__device__ inline void simdgroup_multiply_accumulate_pair(simdgroup_float8x8& d, simdgroup_float8x8& d2,
                                                          const simdgroup_float8x8& a,
                                                          const simdgroup_float8x8& a2,
                                                          const simdgroup_float8x8& b) {
  simdgroup_multiply_accumulate(d, a, b, d);
  simdgroup_multiply_accumulate(d2, a2, b, d2);
}
