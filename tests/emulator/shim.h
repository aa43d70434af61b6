// CPU shim for the kernel bodies in metal_kernels/: the Metal built-ins they use, in C++.
//
// Every GPU thread of a threadgroup is a fiber (ucontext) with its own stack; a threadgroup's fibers
// run round-robin on one OS thread, each until it reaches a synchronisation point:
//   threadgroup_barrier  - waits until every fiber of the threadgroup arrives. A fiber that has
//                          exited while others wait is an error ("barrier divergence").
//   simd_sum             - waits until every lane of its SIMD group (32 consecutive thread indices)
//                          arrives, then all get the sum. Exited lanes are an error.
//   simdgroup_multiply_accumulate - the same wait (all 32 lanes take part), then each lane computes
//                          the whole 8x8 product in float; each lane holds whole matrices, and
//                          simdgroup_store writes only the lane's two elements (as the GPUs).
// Scheduling is deterministic: fiber 0 runs up to its next barrier before fiber 1 starts (or, in
// reverse order, the last fiber first), so a read of threadgroup memory that lacks a barrier sees
// stale data every time, not now and then. The runner launches every kernel in both orders and
// requires equal results: a race that one order hides (a lane reading only what lanes before it
// wrote) shows in the other.
// `threadgroup` variables are function statics, poisoned before each threadgroup (below):
// threadgroups run one after another, so each sees its own. The grid follows MLX's CUDA semantics:
// ceil(grid / threadgroup) threadgroups per axis.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <ucontext.h>
#include <vector>

typedef unsigned int uint;
struct uint3 {
  uint x, y, z;
};

// bfloat16 with round-to-nearest-even from float, as Metal's bfloat16_t and CUDA's __nv_bfloat16.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef _Float16 half;
// float4 as the bodies use it: threadgroup arrays of it, locals, whole copies, .x .y .z .w, and
// make_float4 (CUDA's name; the Metal prelude defines it too)
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace mem_flags {
constexpr int mem_none = 0;
constexpr int mem_device = 1;
constexpr int mem_threadgroup = 2;
}  // namespace mem_flags

using std::exp;
using std::log;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }

// Threadgroup arrays are function statics placed in one section, which the runner fills with 0xFF
// bytes (float NaN, int -1) before every threadgroup: a read of threadgroup memory that no thread of
// the threadgroup wrote gives NaN, on both run orders alike, not what an earlier threadgroup left.
#define threadgroup static __attribute__((section("gdn_threadgroup")))
extern "C" char __start_gdn_threadgroup[] __attribute__((weak));
extern "C" char __stop_gdn_threadgroup[] __attribute__((weak));

namespace emu {

enum State { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = RUNNABLE;
  float simd_value = 0.0f;
  uint3 tid;
  uint index = 0;
};

struct Launch {
  uint3 grid_threads, tg_size, tg_pos;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::string error;
};

inline Launch*& launch_state() {
  static Launch* l = nullptr;
  return l;
}

inline void yield_to_scheduler() {
  Launch* l = launch_state();
  swapcontext(&l->current->ctx, &l->scheduler);
}

}  // namespace emu

inline void threadgroup_barrier(int) {
  emu::launch_state()->current->state = emu::AT_BARRIER;
  emu::yield_to_scheduler();
}

namespace emu {
// An error found inside the body (misuse of a built-in): the launch reports it when it ends.
inline void fail(const char* message) {
  if (launch_state()->error.empty()) launch_state()->error = message;
}
}  // namespace emu

inline float simd_sum(float x) {
  emu::Fiber* f = emu::launch_state()->current;
  f->simd_value = x;
  f->state = emu::AT_SIMD;
  emu::yield_to_scheduler();
  return f->simd_value;
}

// SIMD-group 8x8 float matrices. `product` marks the result of a multiply: the CUDA prelude keeps a
// product in the accumulator (= left factor) role only, so using one as a right factor is an error.
struct simdgroup_float8x8 {
  float e[64];
  bool product = false;
};

template <typename T, int Cols, int Rows>
inline simdgroup_float8x8 make_filled_simdgroup_matrix(T value) {
  simdgroup_float8x8 m;
  for (float& x : m.e) x = value;
  return m;
}

// Pointers of float, or of bfloat16_t / half (the CUDA prelude's device-memory loads and stores;
// Metal's take float only), converted element by element.
template <typename T>
inline void simdgroup_load(simdgroup_float8x8& m, const T* src, unsigned long stride) {
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) m.e[i * 8 + j] = static_cast<float>(src[i * stride + j]);
  m.product = false;
}

template <typename T>
inline void simdgroup_load_transposed(simdgroup_float8x8& m, const T* src, unsigned long stride) {
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) m.e[i * 8 + j] = static_cast<float>(src[j * stride + i]);
  m.product = false;
}

template <typename T>
inline void simdgroup_store(const simdgroup_float8x8& m, T* dst, unsigned long stride) {
  const uint lane = emu::launch_state()->current->index % 32u, row = lane / 4, col = 2 * (lane % 4);
  dst[row * stride + col] = static_cast<T>(m.e[row * 8 + col]);
  dst[row * stride + col + 1] = static_cast<T>(m.e[row * 8 + col + 1]);
}

template <typename T>
inline void simdgroup_store_transposed(const simdgroup_float8x8& m, T* dst, unsigned long stride) {
  const uint lane = emu::launch_state()->current->index % 32u, row = lane / 4, col = 2 * (lane % 4);
  dst[col * stride + row] = static_cast<T>(m.e[row * 8 + col]);
  dst[(col + 1) * stride + row] = static_cast<T>(m.e[row * 8 + col + 1]);
}

// column j of m times scale[j] (every lane holds the whole matrix here)
inline void simdgroup_scale_columns(simdgroup_float8x8& m, const float* scale, uint lane) {
  if (lane != emu::launch_state()->current->index % 32u) emu::fail("simdgroup_scale_columns: lane is not thread_index_in_simdgroup");
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) m.e[i * 8 + j] *= scale[j];
}

// 8 contiguous elements as loaded (CUDA: one or two 16-byte accesses where the pointer is aligned)
template <typename T>
struct gdn_vec8 {
  T e[8];
  float get(int j) const { return static_cast<float>(e[j]); }
};
template <typename T>
inline gdn_vec8<T> gdn_load_vec8(const T* p) {
  gdn_vec8<T> v;
  for (int j = 0; j < 8; ++j) v.e[j] = p[j];
  return v;
}
template <typename T>
inline void gdn_store_vec8(T* p, const float* x) {
  for (int j = 0; j < 8; ++j) p[j] = static_cast<T>(x[j]);
}

// GDN_MMA_BF16 (defined ahead of this file by the kernel's header): factors rounded to bfloat16, as
// the CUDA prelude's BF16 mode multiplies
#ifdef GDN_MMA_BF16
inline float gdn_factor(float x) { return static_cast<float>(bfloat16_t(x)); }
#else
inline float gdn_factor(float x) { return x; }
#endif

inline float gdn_float_factor(float x) { return x; }

inline void gdn_multiply_accumulate(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                    const simdgroup_float8x8& b, const simdgroup_float8x8& c,
                                    float (*factor)(float)) {
  if (b.product) emu::fail("a SIMD-group product used as a right factor (store and load it first)");
  simd_sum(0.0f);  // every lane of the SIMD group must take part
  simdgroup_float8x8 r;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = c.e[i * 8 + j];
      for (int k = 0; k < 8; ++k) acc = std::fma(factor(a.e[i * 8 + k]), factor(b.e[k * 8 + j]), acc);
      r.e[i * 8 + j] = acc;
    }
  r.product = true;
  d = r;
}

inline void simdgroup_multiply_accumulate(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                          const simdgroup_float8x8& b, const simdgroup_float8x8& c) {
  gdn_multiply_accumulate(d, a, b, c, gdn_factor);
}

// float factors whatever GDN_MMA_BF16 says (the CUDA prelude's FP64 products, Metal's float ones)
inline void simdgroup_multiply_accumulate_exact(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                                const simdgroup_float8x8& b, const simdgroup_float8x8& c) {
  gdn_multiply_accumulate(d, a, b, c, gdn_float_factor);
}

inline void simdgroup_multiply_accumulate_pair(simdgroup_float8x8& d, simdgroup_float8x8& d2,
                                               const simdgroup_float8x8& a,
                                               const simdgroup_float8x8& a2,
                                               const simdgroup_float8x8& b) {
  simdgroup_multiply_accumulate(d, a, b, d);
  simdgroup_multiply_accumulate(d2, a2, b, d2);
}

// The per-thread built-ins, read from the current fiber.
#define thread_position_in_threadgroup (emu::launch_state()->current->tid)
#define threads_per_threadgroup (emu::launch_state()->tg_size)
#define threadgroup_position_in_grid (emu::launch_state()->tg_pos)
#define thread_position_in_grid                                                              \
  (uint3{emu::launch_state()->tg_pos.x * emu::launch_state()->tg_size.x +                   \
             emu::launch_state()->current->tid.x,                                           \
         emu::launch_state()->tg_pos.y * emu::launch_state()->tg_size.y +                   \
             emu::launch_state()->current->tid.y,                                           \
         emu::launch_state()->tg_pos.z * emu::launch_state()->tg_size.z +                   \
             emu::launch_state()->current->tid.z})
#define thread_index_in_simdgroup (emu::launch_state()->current->index % 32u)
#define simdgroup_index_in_threadgroup (emu::launch_state()->current->index / 32u)

namespace emu {

typedef void (*Body)();

inline Body& body_fn() {
  static Body b = nullptr;
  return b;
}

inline void fiber_entry() {
  body_fn()();
  Launch* l = launch_state();
  l->current->state = DONE;
  swapcontext(&l->current->ctx, &l->scheduler);
}

// Releases SIMD groups and the barrier where everyone has arrived; returns false on deadlock/error.
inline bool release(Launch& l) {
  size_t n = l.fibers.size();
  bool released = false;
  for (size_t first = 0; first < n; first += 32) {
    size_t last = first + 32 < n ? first + 32 : n;
    size_t waiting = 0, done = 0;
    float sum = 0.0f;
    for (size_t i = first; i < last; ++i) {
      waiting += l.fibers[i].state == AT_SIMD;
      done += l.fibers[i].state == DONE;
    }
    if (waiting == 0) continue;
    if (waiting + done != last - first) continue;  // some lanes still at a threadgroup barrier
    if (done) {
      l.error = "simd_sum called while other lanes of the SIMD group have exited";
      return false;
    }
    // butterfly order, as the GPUs' simd_sum / shfl_xor reductions
    float vals[32];
    for (size_t i = first; i < last; ++i) vals[i - first] = l.fibers[i].simd_value;
    for (size_t off = 16; off > 0; off >>= 1)
      for (size_t i = 0; i < 32; ++i)
        if (i < (last - first) && (i ^ off) < (last - first) && i < (i ^ off)) {
          float a = vals[i], b = vals[i ^ off];
          vals[i] = a + b;
          vals[i ^ off] = a + b;
        }
    sum = vals[0];
    for (size_t i = first; i < last; ++i) {
      l.fibers[i].simd_value = sum;
      l.fibers[i].state = RUNNABLE;
    }
    released = true;
  }
  if (released) return true;
  size_t at_barrier = 0, done = 0;
  for (auto& f : l.fibers) {
    at_barrier += f.state == AT_BARRIER;
    done += f.state == DONE;
  }
  if (at_barrier && at_barrier + done == n) {
    if (done) {
      l.error = "threadgroup_barrier not reached by threads that already returned (divergence)";
      return false;
    }
    for (auto& f : l.fibers) f.state = RUNNABLE;
    return true;
  }
  l.error = "deadlock: SIMD group and threadgroup waits cannot be satisfied";
  return false;
}

// Runs the whole grid; returns 0 or writes an error message into err (size err_len) and returns 1.
// dims: grid (3), threadgroup (3), and whether fibers run in reverse order (see the top).
inline int run_grid(Body body, const int* dims, char* err, int err_len) {
  const bool reverse = dims[6] != 0;
  Launch l;
  l.grid_threads = uint3{(uint)dims[0], (uint)dims[1], (uint)dims[2]};
  l.tg_size = uint3{(uint)dims[3], (uint)dims[4], (uint)dims[5]};
  uint3 groups{(l.grid_threads.x + l.tg_size.x - 1) / l.tg_size.x,
               (l.grid_threads.y + l.tg_size.y - 1) / l.tg_size.y,
               (l.grid_threads.z + l.tg_size.z - 1) / l.tg_size.z};
  size_t n = (size_t)l.tg_size.x * l.tg_size.y * l.tg_size.z;
  l.fibers.resize(n);
  for (auto& f : l.fibers) f.stack.resize(256 * 1024);
  launch_state() = &l;
  body_fn() = body;
  for (uint gz = 0; gz < groups.z; ++gz)
    for (uint gy = 0; gy < groups.y; ++gy)
      for (uint gx = 0; gx < groups.x; ++gx) {
        l.tg_pos = uint3{gx, gy, gz};
        if (__start_gdn_threadgroup != nullptr)
          std::memset(__start_gdn_threadgroup, 0xFF, __stop_gdn_threadgroup - __start_gdn_threadgroup);
        for (size_t i = 0; i < n; ++i) {
          Fiber& f = l.fibers[i];
          f.index = (uint)i;
          f.tid = uint3{(uint)(i % l.tg_size.x), (uint)((i / l.tg_size.x) % l.tg_size.y),
                        (uint)(i / ((size_t)l.tg_size.x * l.tg_size.y))};
          f.state = RUNNABLE;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        size_t alive = n;
        while (alive && l.error.empty()) {
          for (size_t k = 0; k < n; ++k) {
            Fiber& f = l.fibers[reverse ? n - 1 - k : k];
            if (f.state != RUNNABLE) continue;
            l.current = &f;
            swapcontext(&l.scheduler, &f.ctx);
          }
          alive = 0;
          for (auto& f : l.fibers) alive += f.state != DONE;
          if (!l.error.empty() || (alive && !release(l))) {
            std::snprintf(err, err_len, "threadgroup (%u, %u, %u): %s", gx, gy, gz,
                          l.error.c_str());
            launch_state() = nullptr;
            return 1;
          }
        }
      }
  launch_state() = nullptr;
  return 0;
}

}  // namespace emu
