// Chunk scan: the sequential part of the chunked gated delta rule, forward or (REVERSE) backward.
//   forward:  u_n = X_n - A_n h_n;   h_{n+1} = decay_n h_n + B_n^T u_n         (A = W, B = Kt, X = U)
//   backward: du_n = X_n + A_n dh;   dh_n = decay_n dh + Y_n - B_n^T du_n   (A = Kt, B = W, X = PdO, Y = QdO)
// i.e. x = X + s A h and h' = decay h + Y - s B^T x with s = -1 forward, +1 backward; the scan runs
// over chunks in order (REVERSE: from the last), restarting from h_in where seg_start[n] >= 0 and
// writing h_out where seg_end[n] >= 0 (flags already in scan order).
//
// Grid (THREADS, ceil(V / BV), R), threadgroup (THREADS, 1, 1): one threadgroup per (row r = b * HV + head,
// tile of BV value columns). The K x BV state tile lives in registers (for the update) and in
// threadgroup memory (for the product A h, which needs whole columns); both products are register
// tiles of 4 value columns per thread, so each matrix element read feeds 4 multiply-adds. A and B
// are staged CB chunk rows at a time into threadgroup memory by all threads at once (every load in
// flight together): read one by one from device memory, each would wait out its own latency.
// The product A h has only CB x BV / 4 register tiles per stage; when threads outnumber them, the
// k sum is split KS ways and the partial sums meet in threadgroup memory, so every thread works
// (the scan is latency-bound: one warp per scheduler issued an instruction every 4.5 cycles on an
// H200; more warps hide that latency).
// Template: K, V, C, N (chunks), R, THREADS, BV (a multiple of 4 dividing 4 * THREADS), CB (rows per stage, divides
// C), REVERSE, HAS_Y.
// Inputs: A, Bm [N,R,C,K]; X [N,R,C,V]; Y [N,R,K,V] (read only if HAS_Y); decay [N,R];
// h_in [S*R,K,V]; seg_start, seg_end [N] int32.
// Outputs: states [N,R,K,V] (the state entering chunk n, in scan order); x_new [N,R,C,V];
// h_out [S*R,K,V].
constexpr int VG = BV / 4;                      // column groups of 4 per tile
constexpr int GROUPS = THREADS / VG;            // row groups (k for the update, c for the product)
constexpr int KPT = (K + GROUPS - 1) / GROUPS;  // state rows k per thread
constexpr int TILES = CB * VG;                  // register tiles (row, 4 columns) of A h per stage
constexpr int KS = THREADS > TILES ? THREADS / TILES : 1;  // ways the k sum is split
constexpr int KSPAN = (K + KS - 1) / KS;         // k per split
constexpr int TPT = (TILES * KS + THREADS - 1) / THREADS;  // (tile, split) items per thread
constexpr int LPT = (CB * K + THREADS - 1) / THREADS;  // staged elements per thread
constexpr int AS = CB + 1;                      // padded stride of the transposed A stage
constexpr float SIGN = REVERSE ? 1.0f : -1.0f;
threadgroup float h_s[K * BV];
threadgroup float x_s[C * BV];
threadgroup float m_s[K * AS];
threadgroup float p_s[KS * CB * BV];            // partial sums of A h, one set per k split
const uint tid = thread_position_in_threadgroup.x;
const uint r = threadgroup_position_in_grid.z;
const int col = (int)(tid % VG) * 4;           // first of this thread's 4 columns within the tile
const int v0 = (int)threadgroup_position_in_grid.y * BV + col;
const int grp = (int)(tid / VG);
float h[KPT][4];
float staged[LPT];
for (int step = 0; step < N; ++step) {
  const int n = REVERSE ? N - 1 - step : step;
  const uint nr = n * R + r;
  if (seg_start[n] >= 0) {
    const uint base = (seg_start[n] * R + r) * K;
    for (int i = 0; i < KPT; ++i) {
      const int k = grp + GROUPS * i;
      for (int j = 0; j < 4; ++j) {
        const bool inside = k < K && v0 + j < V;
        h[i][j] = inside ? h_in[(base + k) * V + v0 + j] : 0.0f;
        if (k < K) {
          h_s[k * BV + col + j] = h[i][j];
        }
      }
    }
  }
  for (int i = 0; i < KPT; ++i) {
    const int k = grp + GROUPS * i;
    for (int j = 0; j < 4; ++j) {
      if (k < K && v0 + j < V) {
        states[(nr * K + k) * V + v0 + j] = h[i][j];
      }
    }
  }
  // x = X + s A h, CB rows at a time: A's rows staged transposed, m_s[k * AS + cc].
  for (int c0 = 0; c0 < C; c0 += CB) {
    const uint a0 = (nr * C + c0) * K;
    for (int p = 0; p < LPT; ++p) {
      const int e = (int)tid + THREADS * p;
      staged[p] = e < CB * K ? A[a0 + e] : 0.0f;
    }
    for (int p = 0; p < LPT; ++p) {
      const int e = (int)tid + THREADS * p;
      if (e < CB * K) {
        m_s[(e % K) * AS + e / K] = staged[p];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // item = split * TILES + tile: a warp's lanes share the split and walk (row, 4 columns) tiles
    for (int i = 0; i < TPT; ++i) {
      const int item = (int)tid + THREADS * i;
      if (item < TILES * KS) {
        const int tile = item % TILES;
        const int cc = tile / VG;
        const int tc = (tile % VG) * 4;
        const int k0 = (item / TILES) * KSPAN;
        const int k1 = k0 + KSPAN < K ? k0 + KSPAN : K;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = k0; k < k1; ++k) {
          const float a = m_s[k * AS + cc];
          for (int j = 0; j < 4; ++j) {
            acc[j] += a * h_s[k * BV + tc + j];
          }
        }
        for (int j = 0; j < 4; ++j) {
          p_s[(item / TILES * CB + cc) * BV + tc + j] = acc[j];
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int e = (int)tid; e < CB * BV; e += THREADS) {
      const int c = c0 + e / BV;
      const int v = (int)threadgroup_position_in_grid.y * BV + e % BV;
      float acc = 0.0f;
      for (int ks = 0; ks < KS; ++ks) {
        acc += p_s[ks * CB * BV + e];
      }
      const bool inside = v < V;
      const float x = inside ? X[(nr * C + c) * V + v] + SIGN * acc : 0.0f;
      x_s[c * BV + e % BV] = x;
      if (inside) {
        x_new[(nr * C + c) * V + v] = x;
      }
    }
  }
  // h' = decay h + Y - s B^T x on this thread's rows k = grp + GROUPS * i; B staged as is.
  const float d = decay[nr];
  for (int i = 0; i < KPT; ++i) {
    const int k = grp + GROUPS * i;
    for (int j = 0; j < 4; ++j) {
      float y = 0.0f;
      if (HAS_Y && k < K && v0 + j < V) {
        y = Y[(nr * K + k) * V + v0 + j];
      }
      h[i][j] = d * h[i][j] + y;
    }
  }
  for (int c0 = 0; c0 < C; c0 += CB) {
    const uint b0 = (nr * C + c0) * K;
    for (int p = 0; p < LPT; ++p) {
      const int e = (int)tid + THREADS * p;
      staged[p] = e < CB * K ? Bm[b0 + e] : 0.0f;
    }
    for (int p = 0; p < LPT; ++p) {
      const int e = (int)tid + THREADS * p;
      if (e < CB * K) {
        m_s[e] = staged[p];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int cc = 0; cc < CB; ++cc) {
      float xc[4];
      for (int j = 0; j < 4; ++j) {
        xc[j] = x_s[(c0 + cc) * BV + col + j];
      }
      for (int i = 0; i < KPT; ++i) {
        const int k = grp + GROUPS * i;
        const float b = k < K ? m_s[cc * K + k] : 0.0f;
        for (int j = 0; j < 4; ++j) {
          h[i][j] -= SIGN * b * xc[j];
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  // h_s is read again only after the next stage's barrier
  for (int i = 0; i < KPT; ++i) {
    const int k = grp + GROUPS * i;
    for (int j = 0; j < 4; ++j) {
      if (k < K) {
        h_s[k * BV + col + j] = h[i][j];
      }
    }
  }
  if (seg_end[n] >= 0) {
    const uint base = (seg_end[n] * R + r) * K;
    for (int i = 0; i < KPT; ++i) {
      const int k = grp + GROUPS * i;
      for (int j = 0; j < 4; ++j) {
        if (k < K && v0 + j < V) {
          h_out[(base + k) * V + v0 + j] = h[i][j];
        }
      }
    }
  }
}
