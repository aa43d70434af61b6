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

// SIMD-group 8x8 float matrices (Metal's simdgroup_float8x8) on tensor cores. A lane (g = lane / 4,
// t = lane % 4) keeps row g, columns 2t and 2t + 1 (`c`: the accumulator, and the left factor) and
// rows 2t and 2t + 1 of column g (`b`: the right factor). The k index of a product is paired the
// same way on both sides (lane t feeds k = 2t, 2t + 1), so an accumulator is also a left factor as
// it stands: a product can be multiplied again without a store and load. simdgroup_load fills both
// roles and the compiler drops the one a matrix never plays; a product is never a right factor (the
// emulator rejects that).
// Two ways to multiply, chosen per kernel by the header:
//   default: FP64 tensor cores (mma.m8n8k4.f64), exact products summed in double and kept double in
//     the accumulator, rounded to float at the store (and where a product is a factor again);
//   GDN_MMA_BF16 defined: BF16 tensor cores (mma.m16n8k8.bf16), both factors rounded to bfloat16,
//     float accumulators: fla's precision for bfloat16 inputs, at many times the FP64 rate. A pair of
//     8x8 products with one right factor is one 16 x 8 x 8 product.
#ifdef GDN_MMA_BF16
typedef float gdn_acc;
#else
typedef double gdn_acc;
#endif
struct simdgroup_float8x8 {
  float b[2];
  gdn_acc c[2];
};

template <typename T, int Cols, int Rows>
__device__ inline simdgroup_float8x8 make_filled_simdgroup_matrix(T value) {
  simdgroup_float8x8 m;
  m.b[0] = m.b[1] = value;
  m.c[0] = m.c[1] = value;
  return m;
}

// element (i, j) at src[i * row_stride + j * col_stride]; src and dst of float, or (device memory)
// of a 16-bit float type, converted to and from float element by element
template <typename T>
__device__ inline void gdn_simdgroup_load(simdgroup_float8x8& m, const T* src, unsigned long row_stride,
                                          unsigned long col_stride) {
  const uint g = thread_index_in_simdgroup >> 2, t = thread_index_in_simdgroup & 3u;
  for (int h = 0; h < 2; ++h) {
    m.b[h] = static_cast<float>(src[(2 * t + h) * row_stride + g * col_stride]);
    m.c[h] = static_cast<float>(src[g * row_stride + (2 * t + h) * col_stride]);
  }
}

template <typename T>
__device__ inline void gdn_simdgroup_store(const simdgroup_float8x8& m, T* dst, unsigned long row_stride,
                                           unsigned long col_stride) {
  const uint g = thread_index_in_simdgroup >> 2, t = thread_index_in_simdgroup & 3u;
  for (int h = 0; h < 2; ++h) {
    dst[g * row_stride + (2 * t + h) * col_stride] = static_cast<T>((float)m.c[h]);
  }
}

template <typename T>
__device__ inline void simdgroup_load(simdgroup_float8x8& m, const T* src, unsigned long stride) {
  gdn_simdgroup_load(m, src, stride, 1);
}
template <typename T>
__device__ inline void simdgroup_store(const simdgroup_float8x8& m, T* dst, unsigned long stride) {
  gdn_simdgroup_store(m, dst, stride, 1);
}
// the transpose of the 8x8 block at src (element (i, j) = src[j * stride + i]), and its store
template <typename T>
__device__ inline void simdgroup_load_transposed(simdgroup_float8x8& m, const T* src, unsigned long stride) {
  gdn_simdgroup_load(m, src, 1, stride);
}
template <typename T>
__device__ inline void simdgroup_store_transposed(const simdgroup_float8x8& m, T* dst, unsigned long stride) {
  gdn_simdgroup_store(m, dst, 1, stride);
}

// column j of m times scale[j] (j < 8; scale in threadgroup memory), in the lanes that hold it (the
// accumulator's columns 2t, 2t + 1; the right factor's column g): a product's columns scaled without
// a store and load. lane: thread_index_in_simdgroup (Metal's prelude needs it passed).
__device__ inline void simdgroup_scale_columns(simdgroup_float8x8& m, const float* scale, uint lane) {
  const uint g = lane >> 2, t = lane & 3u;
  m.c[0] *= scale[2 * t];
  m.c[1] *= scale[2 * t + 1];
  m.b[0] *= scale[g];
  m.b[1] *= scale[g];
}

// 8 contiguous elements of a device array of T (float, bfloat16 or half) as loaded: one 16-byte load
// for 16-bit types, two for float (one instruction where scalar loads took eight); .get(j) is
// element j as float. gdn_load_vec8(p) and gdn_store_vec8(p, x) (x: 8 floats, stored as T): a p
// that is not 16-byte aligned (a caller's array viewed at an odd offset) takes 8 scalar accesses.
template <typename T>
struct gdn_vec8 {
  uint4 raw[sizeof(T) / 2];
  __device__ float get(int j) const { return static_cast<float>(reinterpret_cast<const T*>(raw)[j]); }
};
template <typename T>
__device__ inline gdn_vec8<T> gdn_load_vec8(const T* p) {
  gdn_vec8<T> v;
  if (reinterpret_cast<size_t>(p) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) {
      v.raw[i] = reinterpret_cast<const uint4*>(p)[i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      reinterpret_cast<T*>(v.raw)[j] = p[j];
    }
  }
  return v;
}
template <typename T>
__device__ inline void gdn_store_vec8(T* p, const float* x) {
  gdn_vec8<T> v;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    reinterpret_cast<T*>(v.raw)[j] = static_cast<T>(x[j]);
  }
  if (reinterpret_cast<size_t>(p) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) {
      reinterpret_cast<uint4*>(p)[i] = v.raw[i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      p[j] = reinterpret_cast<const T*>(v.raw)[j];
    }
  }
}

// d = a b + c on FP64 tensor cores (mma.m8n8k4.f64) whatever the kernel's mode: exact products of
// the float factors, summed in double (rounded to float at the end in BF16 mode, whose accumulators
// are float): for the products a BF16 kernel must keep at float precision (chunk_pieces' inverse).
__device__ inline void simdgroup_multiply_accumulate_exact(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                                           const simdgroup_float8x8& b,
                                                           const simdgroup_float8x8& c) {
  double d0 = c.c[0], d1 = c.c[1];
  for (int h = 0; h < 2; ++h) {  // k = 2t + h: the even k, then the odd
    asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
        : "+d"(d0), "+d"(d1)
        : "d"((double)(float)a.c[h]), "d"((double)b.b[h]));
  }
  d.c[0] = d0;
  d.c[1] = d1;
}

#ifdef GDN_MMA_BF16
// two floats as a bfloat16 pair, lo in the low half (the lower k index)
__device__ inline uint gdn_bf16x2(float lo, float hi) {
  uint r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// d += a b and d2 += a2 b: rows 0-7 and 8-15 of one 16 x 8 x 8 product (A's registers: rows g and
// g + 8, columns 2t and 2t + 1; B's: rows 2t and 2t + 1, column g)
__device__ inline void simdgroup_multiply_accumulate_pair(simdgroup_float8x8& d, simdgroup_float8x8& d2,
                                                          const simdgroup_float8x8& a,
                                                          const simdgroup_float8x8& a2,
                                                          const simdgroup_float8x8& b) {
  const uint a0 = gdn_bf16x2(a.c[0], a.c[1]), a1 = gdn_bf16x2(a2.c[0], a2.c[1]);
  const uint b0 = gdn_bf16x2(b.b[0], b.b[1]);
  asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d.c[0]), "+f"(d.c[1]), "+f"(d2.c[0]), "+f"(d2.c[1])
      : "r"(a0), "r"(a1), "r"(b0));
}

__device__ inline void simdgroup_multiply_accumulate(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                                     const simdgroup_float8x8& b,
                                                     const simdgroup_float8x8& c) {
  simdgroup_float8x8 spare = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  d.c[0] = c.c[0];
  d.c[1] = c.c[1];
  simdgroup_multiply_accumulate_pair(d, spare, a, spare, b);
}
#else
__device__ inline void simdgroup_multiply_accumulate(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                                     const simdgroup_float8x8& b,
                                                     const simdgroup_float8x8& c) {
  simdgroup_multiply_accumulate_exact(d, a, b, c);
}

// d += a b and d2 += a2 b (Metal's prelude defines the same pair).
__device__ inline void simdgroup_multiply_accumulate_pair(simdgroup_float8x8& d, simdgroup_float8x8& d2,
                                                          const simdgroup_float8x8& a,
                                                          const simdgroup_float8x8& a2,
                                                          const simdgroup_float8x8& b) {
  simdgroup_multiply_accumulate(d, a, b, d);
  simdgroup_multiply_accumulate(d2, a2, b, d2);
}
#endif
