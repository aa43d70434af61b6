// A stand-in for the parts of the Metal standard library, and of the MLX header that
// mx.fast.metal_kernel puts before every kernel (its metal::utils(): bfloat16_t, float16_t), that the
// kernel bodies and prelude_metal.h use, declared as the Metal Shading Language specification declares
// them, for clang to check a kernel's source as Metal would compile it (metal_source.py): nothing
// here runs. What Metal is strict about, this is strict about:
//   - address spaces are clang address spaces: a device, constant or threadgroup pointer does not
//     convert to another space or to a thread (plain) pointer, and overloads resolve on them;
//   - simdgroup_load and simdgroup_store take pointers to the matrix's own element type (no float
//     matrix from bfloat16 memory), in device or threadgroup memory;
// Metal declares threadgroup variables at kernel scope; clang wants such a local static, so the check
// puts `static` before each `threadgroup` declaration of a body (metal_source.py).
#pragma once
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define METAL_FUNC inline
#define double metal_has_no_double  // an error wherever a body or the prelude uses double

typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef unsigned long size_t;

namespace metal {

typedef _Float16 half;  // Metal's half and bfloat are arithmetic types too
typedef __bf16 bfloat;

// vectors as clang's (Metal's are the same kind); Metal's constructor syntax float4(x, y, z, w),
// which clang takes only in braces, by a macro (a type name not followed by "(" stays the type)
typedef float float2 __attribute__((ext_vector_type(2)));
typedef float float4 __attribute__((ext_vector_type(4)));
typedef uint uint2 __attribute__((ext_vector_type(2)));
typedef uint uint3 __attribute__((ext_vector_type(3)));
typedef ulong ulong2 __attribute__((ext_vector_type(2)));
#define float2(...) float2{__VA_ARGS__}
#define float4(...) float4{__VA_ARGS__}
#define uint2(...) uint2{__VA_ARGS__}
#define uint3(...) uint3{__VA_ARGS__}
#define ulong2(...) ulong2{__VA_ARGS__}

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

float exp(float);
float log(float);
float rsqrt(float);
float sqrt(float);
float abs(float);
float max(float, float);
float min(float, float);
float simd_sum(float);
float simd_max(float);
float simd_shuffle(float, ushort);
float simd_shuffle_xor(float, ushort);
float simd_broadcast(float, ushort);

template <typename T, int N>
struct vec;
template <typename T>
struct vec<T, 2> {
  T x, y;
  thread T& operator[](int);
  vec& operator*=(T);
};

// simdgroup_matrix<T, Cols, Rows> and its functions (MSL specification, "SIMD-group matrix
// functions"); thread_elements() as MLX's steel GEMMs use it (a lane's two elements)
template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  thread vec<T, 2>& thread_elements();
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <typename T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value);

template <typename T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const device T* src,
                    ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                    bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const threadgroup T* src,
                    ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                    bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, device T* dst, ulong elements_per_row = Cols,
                     ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, threadgroup T* dst,
                     ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                     bool transpose_matrix = false);
template <typename T, int K, int M, int N>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, K, M>& d, const thread simdgroup_matrix<T, N, M>& a,
                                   const thread simdgroup_matrix<T, K, N>& b,
                                   const thread simdgroup_matrix<T, K, M>& c);
template <typename T, int K, int M, int N>
void simdgroup_multiply(thread simdgroup_matrix<T, K, M>& d, const thread simdgroup_matrix<T, N, M>& a,
                        const thread simdgroup_matrix<T, K, N>& b);

}  // namespace metal

using namespace metal;
typedef half float16_t;
typedef bfloat bfloat16_t;
