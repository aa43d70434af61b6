// Chunk scan with the state resident in SIMD-group matrices: the sequential part of the chunked gated
// delta rule, forward or (REVERSE) backward, as chunk_scan.metal computes it (same arguments and
// results), for K a multiple of 8 and V a multiple of the threadgroup's 16 x SG value columns.
//   forward:  x_n = X_n - A_n h_n;                 h_{n+1} = decay_n h_n + B_n^T (tail o x_n)
//   backward: x_n = X_n + tail o (A_n h_n);        h_n     = decay_n h_{n+1} + Y_n - B_n^T x_n
// (forward A = W, B = k, X = U; backward A = k, B = W, X = PdO, Y = QdO; tail_c = e^{gamma_C -
// gamma_c} scales row c, decay = e^{gamma_C}). Each SIMD group owns 16 value columns and keeps their
// state transposed, h^T (16 x K), in 2 x K/8 SIMD-group 8x8 matrices for the whole scan: the state
// never goes through threadgroup memory and SIMD groups share nothing but the staged rows of A and
// B. Transposed, both directions are three products a chunk, each with a left factor in registers:
//   P^T = h^T (s A)^T;   x^T = X^T + P^T D   (forward D = I: the products sum onto X^T;
//   backward D = diag(tail));
//   x'^T = x^T diag(tail) forward, x^T backward;   h^T = h^T (decay I) + Y^T + x'^T (-s B)
// with s = -1 forward, +1 backward folded into the staged rows (exact). Element-wise scalings are
// products with 8x8 diagonal matrices (staged once a chunk), so the bodies need no per-lane element
// access. The scan runs over chunks in order (REVERSE: from the last), restarting from h_in where
// seg_start[n] >= 0 and writing h_out where seg_end[n] >= 0 (flags already in scan order). For
// bfloat16 inputs on CUDA the header defines GDN_MMA_BF16: the products' factors are rounded to
// bfloat16 (tensor cores), as fla's scan rounds W, h, k and x; sums stay float.
//
// Grid (THREADS, V / BV, R), threadgroup (THREADS, 1, 1), BV = 16 x (THREADS / 32): one threadgroup
// per (row r = b * HV + head, tile of BV value columns). A chunk is 2 x C / CB stages of CB rows:
// first the rows of A (x for those rows), then those of B (the update). Stages are double-buffered
// in threadgroup memory: the next stage is stored while the current one computes, and the one after
// is fetched into registers (as loaded: nothing waits on those loads for a stage), so one barrier a
// stage suffices; an A stage's X tiles are loaded a stage ahead. A load the sequential path waits
// for stalls every SIMD group (ncu: most of this kernel's time before these prefetches).
// (Staged rows read 8 elements a load, gdn_load_vec8: 248 -> 176 registers, still one threadgroup
// an SM, and the op's forward 1-4% slower at (8, 2048, 32) and (4, 4096, 16); H100, eighteenth
// session. Not kept.) Device addresses are a pointer per stage, tile row or state plus constant
// offsets, not 32-bit indices: an unsigned index wraps, so the compiler could fold none of the offsets
// and spent an IMAD/LEA pair on every element (nvdisasm: 3144 -> 2040 instructions a chunk forward,
// 248 -> 199 registers; H100 op forward 1-3% faster, nineteenth session).
// Template: K, V, C, THREADS (a multiple of 32), CB (a multiple of 8 dividing C), REVERSE, HAS_Y,
// AT and BT (the types of A and Bm), StateT (the type states and x_new are written in, as in
// chunk_scan.metal), and the staged rows' strides AST (A, read transposed) and BST (B), each >= K
// (padded on CUDA against bank conflicts).
// Inputs: A, Bm [N,R,C,K] (k: Bm forward, A backward), X [N,R,C,V] in any float type; Y [N,R,K,V]
// (read only if HAS_Y); gamma [N,R,C]; h_in [S*R,K,V]; seg_start, seg_end [N] int32; dims [2] int32:
// N (chunks) and R (rows). Outputs: states [N,R,K,V] (the state entering chunk n, in scan order)
// and x_new [N,R,C,V], in StateT; h_out [S*R,K,V] float.
constexpr int SG = THREADS / 32;
constexpr int BV = 16 * SG;
constexpr int KB = K / 8;
constexpr int CT = C / 8;                            // 8-column tiles of a chunk
constexpr int JT = CB / 8;                           // 8-row tiles of a stage
constexpr int STAGES = C / CB;
constexpr int ST = AST > BST ? AST : BST;
constexpr int LPT = (CB * K + THREADS - 1) / THREADS;  // staged elements per thread
constexpr int GPT = (C + THREADS - 1) / THREADS;       // gamma values per thread
constexpr bool FULL = CB * K % THREADS == 0;          // every thread stages LPT elements
constexpr float SIGN = REVERSE ? 1.0f : -1.0f;
threadgroup float m_s[2 * CB * ST];
threadgroup float d_s[(CT + 1) * 64];  // diag(tail) of each 8-row tile, then decay I
const int N = dims[0], R = dims[1];
const uint tid = thread_position_in_threadgroup.x;
const int sg = (int)simdgroup_index_in_threadgroup;
const uint r = threadgroup_position_in_grid.z;
const int v0 = (int)threadgroup_position_in_grid.y * BV + 16 * sg;  // the SIMD group's first column
const int total = N * 2 * STAGES;
for (int e = (int)tid; e < (CT + 1) * 64; e += THREADS) {
  d_s[e] = 0.0f;
}
simdgroup_float8x8 h[KB], h2[KB];   // h^T, rows (value columns) v0 ... v0 + 7 (h), v0 + 8 ... (h2)
simdgroup_float8x8 xs[CT], xs2[CT];  // the chunk's x'^T, kept for the update
const simdgroup_float8x8 zero = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
#pragma unroll
for (int kb = 0; kb < KB; ++kb) {
  h[kb] = zero;
  h2[kb] = zero;
}
AT raw_a[LPT];  // the stage after next, as loaded: converted and signed only when stored, so that
BT raw_b[LPT];  // no instruction waits on the loads before the next stage (rows of A, or of B)
float gam[GPT];  // and its chunk's gamma
float glast = 0.0f;
// the next stage's X tiles and (a chunk's first stage) restart flag, loaded a stage ahead: on the
// sequential path, a load that waits is a stall of every SIMD group
simdgroup_float8x8 xn[JT], xn2[JT];
int start_next = -1;
threadgroup_barrier(mem_flags::mem_threadgroup);
// stage q = (step, s) of the scan, q = step * 2 STAGES + s; the first pass (step -1) only stages
for (int step = -1; step < N; ++step) {
  const int n = REVERSE ? N - 1 - step : step;
  const uint nr = n * R + r;
#pragma unroll
  for (int s = 0; s < 2 * STAGES; ++s) {
    const int q = step * 2 * STAGES + s;
    // an A stage's products accumulate on X forward (D = I); backward X is added after the diag(tail)
    // product. Taken from the prefetched tiles before the next stage's overwrite them.
    simdgroup_float8x8 acc[JT], acc2[JT], xc[JT], xc2[JT];
    if (s < STAGES) {
#pragma unroll
      for (int j = 0; j < JT; ++j) {
        acc[j] = REVERSE ? zero : xn[j];
        acc2[j] = REVERSE ? zero : xn2[j];
        xc[j] = xn[j];
        xc2[j] = xn2[j];
      }
    }
    if (q + 1 >= 0 && q + 1 < total) {
      // the fetched stage q + 1 into buffer (s + 1) % 2, whose last readers (stage q - 1) are done;
      // with a chunk's first stage its diagonals (read only by A stages, and not by stage q: the
      // last of the chunk before, or none)
      const int fs = (s + 1) % (2 * STAGES);
      const int stride = fs < STAGES ? AST : BST;
      for (int p = 0; p < LPT; ++p) {
        const int e = (int)tid + THREADS * p;
        const int row = THREADS % K == 0 ? (int)tid / K + p * (THREADS / K) : e / K;
        const int col = THREADS % K == 0 ? (int)tid % K : e % K;
        if (FULL || e < CB * K) {
          m_s[(s + 1) % 2 * CB * ST + row * stride + col] =
              fs < STAGES ? SIGN * static_cast<float>(raw_a[p]) : -SIGN * static_cast<float>(raw_b[p]);
        }
      }
      if (fs == 0) {
        for (int p = 0; p < GPT; ++p) {
          const int c = (int)tid + THREADS * p;
          if (c < C) {
            d_s[c / 8 * 64 + c % 8 * 9] = exp(glast - gam[p]);
          }
        }
        if (tid < 8) {
          d_s[CT * 64 + tid * 9] = exp(glast);
        }
      }
      if (fs < STAGES) {  // an A stage next: its X tiles (and restart flag)
        const int nn = fs == 0 ? (REVERSE ? n - 1 : n + 1) : n;
        const auto x_at = X + (((uint)(nn * R + r)) * C + fs * CB) * V + v0;
#pragma unroll
        for (int j = 0; j < JT; ++j) {
          simdgroup_load_transposed(xn[j], x_at + j * 8 * V, V);
          simdgroup_load_transposed(xn2[j], x_at + j * 8 * V + 8, V);
        }
        if (fs == 0) {
          start_next = seg_start[nn];
        }
      }
    }
    if (q + 2 >= 0 && q + 2 < total) {
      // stage q + 2 into registers: rows of A or of B, with a chunk's first stage its gamma
      const int fs = (s + 2) % (2 * STAGES), fstep = step + (s + 2) / (2 * STAGES);
      const int fn = REVERSE ? N - 1 - fstep : fstep;
      const uint base = ((uint)(fn * R + r) * C + fs % STAGES * CB) * K + tid;
      const auto a_at = A + base;
      const auto b_at = Bm + base;
      for (int p = 0; p < LPT; ++p) {
        if (FULL || (int)tid + THREADS * p < CB * K) {
          if (fs < STAGES) {
            raw_a[p] = a_at[THREADS * p];
          } else {
            raw_b[p] = b_at[THREADS * p];
          }
        }
      }
      if (fs == 0) {
        const uint g_at = (uint)(fn * R + r) * C;
        glast = gamma[g_at + C - 1];
        for (int p = 0; p < GPT; ++p) {
          const int c = (int)tid + THREADS * p;
          gam[p] = c < C ? gamma[g_at + c] : 0.0f;
        }
      }
    }
    if (q < 0) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
      continue;
    }
    if (s < STAGES) {
      if (s == 0) {  // the chunk's entering state: restarted from h_in, written to states
        if (start_next >= 0) {
          const auto h_at = h_in + (uint)(start_next * R + r) * K * V + v0;
#pragma unroll
          for (int kb = 0; kb < KB; ++kb) {
            simdgroup_load_transposed(h[kb], h_at + kb * 8 * V, V);
            simdgroup_load_transposed(h2[kb], h_at + kb * 8 * V + 8, V);
          }
        }
        const auto states_at = states + nr * K * V + v0;
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_store_transposed(h[kb], states_at + kb * 8 * V, V);
          simdgroup_store_transposed(h2[kb], states_at + kb * 8 * V + 8, V);
        }
      }
      // P^T for the stage's JT tiles of 8 rows, h^T's k blocks outermost (each multiplies JT times)
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {
#pragma unroll
        for (int j = 0; j < JT; ++j) {
          simdgroup_float8x8 at;
          simdgroup_load_transposed(at, &m_s[s % 2 * CB * ST + j * 8 * AST + kb * 8], AST);
          simdgroup_multiply_accumulate_pair(acc[j], acc2[j], h[kb], h2[kb], at);
        }
      }
      const auto x_new_at = x_new + nr * C * V + v0;
#pragma unroll
      for (int j = 0; j < JT; ++j) {
        const int jc = s * JT + j;  // the tile's place in the chunk
        const auto xo = x_new_at + jc * 8 * V;
        simdgroup_float8x8 dm;
        simdgroup_load(dm, &d_s[jc * 64], 8);
        if (REVERSE) {
          simdgroup_multiply_accumulate_pair(xc[j], xc2[j], acc[j], acc2[j], dm);
          simdgroup_store_transposed(xc[j], xo, V);
          simdgroup_store_transposed(xc2[j], xo + 8, V);
          xs[jc] = xc[j];
          xs2[jc] = xc2[j];
        } else {
          simdgroup_store_transposed(acc[j], xo, V);
          simdgroup_store_transposed(acc2[j], xo + 8, V);
          xs[jc] = zero;
          xs2[jc] = zero;
          simdgroup_multiply_accumulate_pair(xs[jc], xs2[jc], acc[j], acc2[j], dm);
        }
      }
      if (s == STAGES - 1) {  // every product with the old state is done: h = decay h + Y
        simdgroup_float8x8 dm;
        simdgroup_load(dm, &d_s[CT * 64], 8);
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_float8x8 y = zero, y2 = zero;
          if (HAS_Y) {
            const auto y_at = Y + (nr * K + kb * 8) * V + v0;
            simdgroup_load_transposed(y, y_at, V);
            simdgroup_load_transposed(y2, y_at + 8, V);
          }
          simdgroup_multiply_accumulate_pair(y, y2, h[kb], h2[kb], dm);
          h[kb] = y;
          h2[kb] = y2;
        }
      }
    } else {
      const int sb = s - STAGES;
      const int end_at = s == 2 * STAGES - 1 ? seg_end[n] : -1;  // read ahead of the products
#pragma unroll
      for (int j = 0; j < JT; ++j) {  // each tile of x'^T multiplies KB times
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_float8x8 b;
          simdgroup_load(b, &m_s[s % 2 * CB * ST + j * 8 * BST + kb * 8], BST);
          simdgroup_multiply_accumulate_pair(h[kb], h2[kb], xs[sb * JT + j], xs2[sb * JT + j], b);
        }
      }
      if (end_at >= 0) {
        const auto h_at = h_out + (uint)(end_at * R + r) * K * V + v0;
#pragma unroll
        for (int kb = 0; kb < KB; ++kb) {
          simdgroup_store_transposed(h[kb], h_at + kb * 8 * V, V);
          simdgroup_store_transposed(h2[kb], h_at + kb * 8 * V + 8, V);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}
