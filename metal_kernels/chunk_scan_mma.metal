// Chunk scan on SIMD-group 8x8 matrices: the sequential part of the chunked gated delta rule, forward
// or (REVERSE) backward.
//   forward:  u_n = X_n - A_n h_n;   h_{n+1} = decay_n h_n + B_n^T u_n         (A = W, B = Kt, X = U)
//   backward: du_n = X_n + A_n dh;   dh_n = decay_n dh + Y_n - B_n^T du_n   (A = Kt, B = W, X = PdO, Y = QdO)
// i.e. x = X + s A h and h' = decay h + Y - s B^T x with s = -1 forward, +1 backward. As in
// chunk_scan.metal the kernel reads k, not Kt, and scales the rows of x (forward) or of A h
// (backward) by tail_c = e^{gamma_C - gamma_c} (decay = e^{gamma_C}). The scan runs
// over chunks in order (REVERSE: from the last), restarting from h_in where seg_start[n] >= 0 and
// writing h_out where seg_end[n] >= 0 (flags already in scan order).
//
// Grid (THREADS, ceil(V / BV), R), threadgroup (THREADS, 1, 1): one threadgroup per (row r = b * HV +
// head, tile of BV value columns). The K x BV state tile lives in threadgroup memory (h_s, rows padded
// to a multiple of 16 with zeros). Products come in pairs of 8x8 tiles with the same right factor
// (simdgroup_multiply_accumulate_pair: the factor loaded once; H100, FP64 prelude: 5-7% faster than
// single products). Per chunk, CB chunk rows at a time ("stages"):
//   1. x = X + s A h: each SIMD group multiplies a 16-row block of A (staged) by all VB column blocks
//      of h (each A tile loaded once for VB products); the k sum is split KS ways so that every SIMD
//      group works, and the partial sums meet in threadgroup memory (p_s), where X is added and x
//      written out.
//   2. h' = decay h + Y - s B^T x: each SIMD group owns TPS pairs of 8x8 tiles of h (rows 16 apart
//      in blocks of 16), accumulated across the stages in registers (B staged transposed) and stored
//      back after the last stage.
// The next stage's rows of A or B (and X) are loaded into registers while the current one computes:
// they do not depend on h, so the global-memory latency stays off the sequential path.
// Template: K, V, C, THREADS (a multiple of 32), BV (a multiple of 8), CB (rows per
// stage, a multiple of 16 dividing C), KS (ways the k sum of A h is split), REVERSE, HAS_Y, and the
// row strides of the threadgroup arrays (padded on CUDA against bank conflicts): AST (staged A, >= K
// rounded up to 16), BST (staged B^T, >= CB), HST (h_s, x_s, p_s, >= BV), StateT (the type states
// and x_new are written in, as in chunk_scan.metal).
// Inputs: A, Bm [N,R,C,K] (k: Bm forward, A backward), X [N,R,C,V] in any float type; Y [N,R,K,V]
// (read only if HAS_Y); gamma [N,R,C] (the within-chunk cumsum of g);
// h_in [S*R,K,V]; seg_start, seg_end [N] int32; dims [2] int32: N (chunks) and R (rows, batch x
// value heads), read at run time so that a new sequence length needs no new kernel.
// Outputs: states [N,R,K,V] (the state entering chunk n, in scan order) and x_new [N,R,C,V] in
// StateT; h_out [S*R,K,V] float.
constexpr int SG = THREADS / 32;                   // SIMD groups
constexpr int KB = (K + 15) / 16 * 2;              // 8-row blocks of the state, an even number
constexpr int VB = BV / 8;
constexpr int STAGES = C / CB;
constexpr int KSPAN = (KB + KS - 1) / KS;          // k blocks per split of A h
constexpr int IPS = (CB / 16 * KS + SG - 1) / SG;  // (16-row block, split) items per SIMD group
constexpr int T2 = KB / 2 * VB;                    // pairs of 8x8 tiles of the state
constexpr int TPS = (T2 + SG - 1) / SG;            // state tile pairs per SIMD group
constexpr int LPT = (CB * KB * 8 + THREADS - 1) / THREADS;  // staged elements per thread
constexpr int XPT = (CB * BV + THREADS - 1) / THREADS;      // X elements per thread and stage
constexpr int HPT = (K * BV + THREADS - 1) / THREADS;       // state elements per thread
constexpr int MS = CB * AST > KB * 8 * BST ? CB * AST : KB * 8 * BST;
constexpr float SIGN = REVERSE ? 1.0f : -1.0f;
threadgroup float m_s[MS];                         // the staged rows of A, or of B transposed
threadgroup float h_s[KB * 8 * HST];
threadgroup float x_s[C * HST];                    // -s x: the update adds B^T x_s
threadgroup float p_s[KS * CB * HST];
const int N = dims[0], R = dims[1];
const uint tid = thread_position_in_threadgroup.x;
const int sg = (int)simdgroup_index_in_threadgroup;
const uint r = threadgroup_position_in_grid.z;
const int vt = (int)threadgroup_position_in_grid.y * BV;  // first value column of the tile
for (int e = (int)tid; e < KB * 8 * HST; e += THREADS) {
  h_s[e] = 0.0f;  // rows from K to the multiple of 8 stay zero
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float staged[LPT];  // the next stage's elements of A or B (zero in the padding from K up)
float xs[XPT], xs_next[XPT];
float tails[XPT], gam[XPT];  // the tails of the X elements' rows, from gamma there and at the
float glast = 0.0f, decay = 0.0f;  // chunk's end (prefetched; exp taken when the stage is stored)
simdgroup_float8x8 acc[TPS], acc2[TPS];  // a tile pair's upper and lower 8 rows
const int total = N * 2 * STAGES;
// it = -1 only fetches the first stage; stage s of chunk step: s < STAGES stages A, else B
for (int it = -1; it < total; ++it) {
  const int step = it < 0 ? 0 : it / (2 * STAGES);
  const int s = it < 0 ? 0 : it % (2 * STAGES);
  const int n = REVERSE ? N - 1 - step : step;
  const uint nr = n * R + r;
  if (it >= 0) {
    if (s == 0) {
      // the chunk's entering state: restarted from h_in, written to states (same element per thread
      // in every pass over h_s, so these passes need no barrier between them)
      for (int p = 0; p < HPT; ++p) {
        const int e = (int)tid + THREADS * p;
        const int k = e / BV, v = vt + e % BV;
        if (e < K * BV) {
          if (seg_start[n] >= 0) {
            h_s[k * HST + e % BV] = v < V ? h_in[((seg_start[n] * R + r) * K + k) * V + v] : 0.0f;
          }
          if (v < V) {
            states[(nr * K + k) * V + v] = static_cast<StateT>(h_s[k * HST + e % BV]);
          }
        }
      }
    }
    // stage elements e < CB * KB * 8: A row-major, (row e / (8 KB), column e % (8 KB)); B transposed,
    // a SIMD group's 32 consecutive elements 4 rows x 8 columns (no bank conflicts on CUDA)
    if (s < STAGES) {
      for (int p = 0; p < LPT; ++p) {
        const int e = (int)tid + THREADS * p;
        if (e < CB * KB * 8) {
          m_s[e / (KB * 8) * AST + e % (KB * 8)] = staged[p];
        }
      }
    } else {
      for (int p = 0; p < LPT; ++p) {
        const int e = (int)tid + THREADS * p;
        const int blk = e / 32, w = e % 32;
        if (e < CB * KB * 8) {
          m_s[(blk % KB * 8 + w % 8) * BST + blk / KB * 4 + w / 8] = staged[p];
        }
      }
    }
    for (int p = 0; p < XPT; ++p) {
      xs[p] = xs_next[p];
      tails[p] = s < STAGES ? exp(glast - gam[p]) : 0.0f;
    }
    if (s == 0) {
      decay = exp(glast);
    }
  }
  {  // fetch the next stage (and its X)
    const int it2 = it + 1;
    const int s2 = it2 % (2 * STAGES);
    const int n2 = REVERSE ? N - 1 - it2 / (2 * STAGES) : it2 / (2 * STAGES);
    if (it2 < total) {
      const int c0 = (s2 % STAGES) * CB;
      const uint base = ((uint)(n2 * R + r) * C + c0) * K;
      if (s2 < STAGES) {
        for (int p = 0; p < LPT; ++p) {
          const int e = (int)tid + THREADS * p;
          const int c = e / (KB * 8), k = e % (KB * 8);
          staged[p] = e < CB * KB * 8 && k < K ? static_cast<float>(A[base + c * K + k]) : 0.0f;
        }
      } else {
        for (int p = 0; p < LPT; ++p) {
          const int e = (int)tid + THREADS * p;
          const int blk = e / 32, w = e % 32;
          const int c = blk / KB * 4 + w / 8, k = blk % KB * 8 + w % 8;
          staged[p] = e < CB * KB * 8 && k < K ? static_cast<float>(Bm[base + c * K + k]) : 0.0f;
        }
      }
      if (s2 < STAGES) {
        const uint g_at = (uint)(n2 * R + r) * C;
        glast = gamma[g_at + C - 1];
        for (int p = 0; p < XPT; ++p) {
          const int e = (int)tid + THREADS * p;
          const int v = vt + e % BV;
          const bool inside = e < CB * BV && v < V;
          xs_next[p] = inside ? static_cast<float>(X[((uint)(n2 * R + r) * C + c0 + e / BV) * V + v]) : 0.0f;
          gam[p] = e < CB * BV ? gamma[g_at + c0 + e / BV] : 0.0f;
        }
      }
    }
  }
  if (it < 0) {
    continue;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (s < STAGES) {
    const int c0 = s * CB;
    for (int i = 0; i < IPS; ++i) {
      const int item = sg + SG * i;
      if (item < CB / 16 * KS) {
        const int cb = item % (CB / 16), split = item / (CB / 16);  // rows 16 cb ... 16 cb + 15
        const int k1 = (split + 1) * KSPAN < KB ? (split + 1) * KSPAN : KB;
        simdgroup_float8x8 sum[VB], sum2[VB];
        for (int vb = 0; vb < VB; ++vb) {
          sum[vb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
          sum2[vb] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }
        for (int kb = split * KSPAN; kb < k1; ++kb) {
          simdgroup_float8x8 a, a2;
          simdgroup_load(a, &m_s[cb * 16 * AST + kb * 8], AST);
          simdgroup_load(a2, &m_s[(cb * 16 + 8) * AST + kb * 8], AST);
          for (int vb = 0; vb < VB; ++vb) {
            simdgroup_float8x8 b;
            simdgroup_load(b, &h_s[kb * 8 * HST + vb * 8], HST);
            simdgroup_multiply_accumulate_pair(sum[vb], sum2[vb], a, a2, b);
          }
        }
        for (int vb = 0; vb < VB; ++vb) {
          simdgroup_store(sum[vb], &p_s[(split * CB + cb * 16) * HST + vb * 8], HST);
          simdgroup_store(sum2[vb], &p_s[(split * CB + cb * 16 + 8) * HST + vb * 8], HST);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int p = 0; p < XPT; ++p) {
      const int e = (int)tid + THREADS * p;
      if (e < CB * BV) {
        const int c = c0 + e / BV, j = e % BV;
        float sum = 0.0f;
        for (int split = 0; split < KS; ++split) {
          sum += p_s[(split * CB + e / BV) * HST + j];
        }
        // k's rows as Kt's: backward A h's rows, forward x's rows as B^T multiplies them
        const float x = vt + j < V ? xs[p] + SIGN * (REVERSE ? tails[p] * sum : sum) : 0.0f;
        x_s[c * HST + j] = -SIGN * (REVERSE ? x : tails[p] * x);
        if (vt + j < V) {
          x_new[(nr * C + c) * V + vt + j] = static_cast<StateT>(x);
        }
      }
    }
    if (s == STAGES - 1) {  // every product with h is done: h = decay h + Y
      const float d = decay;
      for (int p = 0; p < HPT; ++p) {
        const int e = (int)tid + THREADS * p;
        const int k = e / BV, v = vt + e % BV;
        if (e < K * BV) {
          const float y = HAS_Y && v < V ? Y[(nr * K + k) * V + v] : 0.0f;
          h_s[k * HST + e % BV] = d * h_s[k * HST + e % BV] + y;
        }
      }
    }
  } else {
    const int c0 = (s - STAGES) * CB;
    // tile pair p: state rows 16 (p / VB) ... + 15, columns 8 (p % VB) ... + 7
    for (int i = 0; i < TPS; ++i) {
      const int tile = sg + SG * i;
      if (s == STAGES && tile < T2) {
        simdgroup_load(acc[i], &h_s[tile / VB * 16 * HST + tile % VB * 8], HST);
        simdgroup_load(acc2[i], &h_s[(tile / VB * 16 + 8) * HST + tile % VB * 8], HST);
      }
    }
    for (int cb = 0; cb < CB / 8; ++cb) {
      for (int i = 0; i < TPS; ++i) {
        const int tile = sg + SG * i;
        if (tile < T2) {
          simdgroup_float8x8 a, a2, b;
          simdgroup_load(a, &m_s[tile / VB * 16 * BST + cb * 8], BST);
          simdgroup_load(a2, &m_s[(tile / VB * 16 + 8) * BST + cb * 8], BST);
          simdgroup_load(b, &x_s[(c0 + cb * 8) * HST + tile % VB * 8], HST);
          simdgroup_multiply_accumulate_pair(acc[i], acc2[i], a, a2, b);
        }
      }
    }
    if (s == 2 * STAGES - 1) {
      for (int i = 0; i < TPS; ++i) {
        const int tile = sg + SG * i;
        if (tile < T2) {
          simdgroup_store(acc[i], &h_s[tile / VB * 16 * HST + tile % VB * 8], HST);
          simdgroup_store(acc2[i], &h_s[(tile / VB * 16 + 8) * HST + tile % VB * 8], HST);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (s == 2 * STAGES - 1 && seg_end[n] >= 0) {
      for (int p = 0; p < HPT; ++p) {
        const int e = (int)tid + THREADS * p;
        const int k = e / BV, v = vt + e % BV;
        if (e < K * BV && v < V) {
          h_out[((seg_end[n] * R + r) * K + k) * V + v] = h_s[k * HST + e % BV];
        }
      }
    }
  }
}
