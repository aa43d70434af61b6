// Chunk scan: the sequential part of the chunked gated delta rule, forward or (REVERSE) backward.
//   forward:  u_n = X_n - A_n h_n;   h_{n+1} = decay_n h_n + B_n^T u_n         (A = W, B = Kt, X = U)
//   backward: du_n = X_n + A_n dh;   dh_n = decay_n dh + Y_n - B_n^T du_n   (A = Kt, B = W, X = PdO, Y = QdO)
// i.e. x = X + s A h and h' = decay h + Y - s B^T x with s = -1 forward, +1 backward. The kernel
// reads k, not Kt = diag(tail) k (tail_c = e^{gamma_C - gamma_c}, decay = e^{gamma_C}, from gamma):
// forward it scales the rows of x instead (B^T diag(tail) x), backward the rows of A h. A pass over
// k (writing Kt for the scan to read) is saved, and k may stay in its input type. The scan runs
// over chunks in order (REVERSE: from the last), restarting from h_in where seg_start[n] >= 0 and
// writing h_out where seg_end[n] >= 0 (flags already in scan order).
//
// Grid (THREADS, ceil(V / BV), R), threadgroup (THREADS, 1, 1): one threadgroup per (row r = b * HV + head,
// tile of BV value columns). The K x BV state tile lives in registers (for the update) and in
// threadgroup memory (for the product A h, which needs whole columns). Both products work on 4 x 4
// register tiles read as float4 from threadgroup memory (two 16-byte reads feed 16 multiply-adds).
// A and B are staged CB chunk rows at a time: A transposed, so that a float4 holds 4 of its rows at
// one column; B as it is. The stages run as one sequence (per chunk C / CB stages of A, then of B),
// and the next stage's rows (and X) are fetched into registers while the current one computes: they
// do not depend on h, so global-memory latency stays off the sequential path. The product A h has
// only (CB / 4) x (BV / 4) tiles a stage; when threads outnumber them, the k sum is split KS ways
// (short dependent chains) and the partial sums meet in threadgroup memory.
// Template: K, V, C, THREADS, BV (a multiple of 4 dividing 4 * THREADS), CB (rows per
// stage, a multiple of 4 dividing C), REVERSE, HAS_Y, AT, BT and XT (the types of A, Bm and X), StateT
// (the type states and x_new are written in: float, or bfloat16 where their readers round them to
// it: kernels.forward_types).
// Inputs: A, Bm [N,R,C,K] (k: Bm forward, A backward), X [N,R,C,V] in any float type; Y [N,R,K,V]
// (read only if HAS_Y); gamma [N,R,C] (the within-chunk cumsum of g);
// h_in [S*R,K,V]; seg_start, seg_end [N] int32; dims [2] int32: N (chunks) and R (rows, batch x
// value heads), read at run time so that a new sequence length needs no new kernel.
// Outputs: states [N,R,K,V] (the state entering chunk n, in scan order) and x_new [N,R,C,V] in
// StateT; h_out [S*R,K,V] float.
constexpr int VG = BV / 4;                          // column groups of 4 per tile
constexpr int KG = (K + 3) / 4;                     // row groups of 4 of the state (the last padded)
constexpr int RG = CB / 4;                          // row groups of 4 of a stage
// A's stage is stored with its row groups rotated by k / SH, so that the lanes storing consecutive k
// hit different banks; measured faster at 16 columns, slower at 32 (no rotation there).
constexpr bool ROTATE = BV <= 16;
constexpr int SH = RG >= 8 ? 1 : 8 / RG;
constexpr int SLOTS = THREADS / VG;                 // update: threads per column group
constexpr int KGPT = (KG + SLOTS - 1) / SLOTS;      // update: row groups per thread
constexpr int TILES = RG * VG;                      // 4 x 4 tiles of A h per stage
constexpr int KS = THREADS > TILES ? THREADS / TILES : 1;  // ways the k sum is split
constexpr int KSPAN = (K + KS - 1) / KS;            // k per split
constexpr int TPT = (TILES * KS + THREADS - 1) / THREADS;  // (tile, split) items per thread
constexpr int APT = (K * RG + THREADS - 1) / THREADS;      // staged A items (k, row group) per thread
constexpr int BPT = (CB * KG + THREADS - 1) / THREADS;     // staged B items (row, k group) per thread
constexpr int SPT = APT > BPT ? APT : BPT;
constexpr int XPT = (CB * VG + THREADS - 1) / THREADS;     // x items (row, column group) per thread
constexpr int STAGES = C / CB;                      // stages of each product per chunk
constexpr float SIGN = REVERSE ? 1.0f : -1.0f;
threadgroup float4 h_s[KG * 4 * VG];                // h_s[k * VG + cg]: state row k, columns 4 cg ...
threadgroup float4 x_s[C * VG];                     // x_s[c * VG + cg]
threadgroup float4 m_s[KG * 4 * RG];                // A: m_s[k * RG + rg'] (rg' = rg rotated), rows 4 rg; B: m_s[c * KG + kg]
threadgroup float4 p_s[KS * CB * VG];               // partial sums of A h, one set per k split
const int N = dims[0], R = dims[1];
const uint tid = thread_position_in_threadgroup.x;
const uint r = threadgroup_position_in_grid.z;
const int cg = (int)(tid % VG);                     // update: this thread's column group
const int vt = (int)threadgroup_position_in_grid.y * BV;  // first value column of the tile
const int v0 = vt + 4 * cg;
const int slot = (int)(tid / VG);
float h[KGPT][4][4];  // update: rows 4 (slot + SLOTS i) + a, columns v0 + j
AT staged_a[SPT][4];  // the next stage's items of A or B, as loaded: converted only when stored, so
BT staged_b[SPT][4];  // that no instruction waits on the loads before the stage (a wait on a bf16
                      // k converted at once cost the forward 20%: H100, sixteenth session)
XT xs[XPT][4];         // the next stage's items of X (as loaded, too)
float gam[XPT];        // and gamma at their rows, and at the chunk's end (exp is taken only when
float glast = 0.0f;    // the stage is stored: the loads' latency stays off the sequential path)
float decay = 0.0f;    // the current chunk's e^{gamma_C}
const int total = N * 2 * STAGES;
// stage it of the scan: chunk step it / (2 STAGES); its first STAGES stages multiply by A, the
// others update with B. it = -1 only fetches the first stage.
for (int it = -1; it < total; ++it) {
  const int step = it < 0 ? 0 : it / (2 * STAGES);
  const int s = it < 0 ? 0 : it % (2 * STAGES);
  const int n = REVERSE ? N - 1 - step : step;
  const uint nr = n * R + r;
  float x_cur[XPT][4];
  float tail_cur[XPT];
  if (it >= 0) {
    if (s == 0) {
      if (seg_start[n] >= 0) {
        const uint base = (seg_start[n] * R + r) * K;
        for (int i = 0; i < KGPT; ++i) {
          for (int a = 0; a < 4; ++a) {
            const int k = 4 * (slot + SLOTS * i) + a;
            for (int j = 0; j < 4; ++j) {
              h[i][a][j] = k < K && v0 + j < V ? h_in[(base + k) * V + v0 + j] : 0.0f;
            }
            const float4 t = make_float4(h[i][a][0], h[i][a][1], h[i][a][2], h[i][a][3]);
            if (k < K) {
              h_s[k * VG + cg] = t;
            }
          }
        }
      }
      for (int i = 0; i < KGPT; ++i) {
        for (int a = 0; a < 4; ++a) {
          const int k = 4 * (slot + SLOTS * i) + a;
          for (int j = 0; j < 4; ++j) {
            if (k < K && v0 + j < V) {
              states[(nr * K + k) * V + v0 + j] = static_cast<StateT>(h[i][a][j]);
            }
          }
        }
      }
    }
    if (s == STAGES) {  // every product with h is done: h = decay h + Y (this thread's rows)
      const float d = decay;
      for (int i = 0; i < KGPT; ++i) {
        for (int a = 0; a < 4; ++a) {
          const int k = 4 * (slot + SLOTS * i) + a;
          for (int j = 0; j < 4; ++j) {
            float y = 0.0f;
            if (HAS_Y && k < K && v0 + j < V) {
              y = Y[(nr * K + k) * V + v0 + j];
            }
            h[i][a][j] = d * h[i][a][j] + y;
          }
        }
      }
    }
    // the current stage into threadgroup memory
    for (int p = 0; p < SPT; ++p) {
      const int e = (int)tid + THREADS * p;
      if (e < (s < STAGES ? K * RG : CB * KG)) {
        float t4[4];
        for (int a = 0; a < 4; ++a) {
          t4[a] = s < STAGES ? static_cast<float>(staged_a[p][a]) : static_cast<float>(staged_b[p][a]);
        }
        const float4 t = make_float4(t4[0], t4[1], t4[2], t4[3]);
        m_s[s >= STAGES ? e : ROTATE ? (e % K) * RG + (e / K + e % K / SH) % RG : (e % K) * RG + e / K] = t;
      }
    }
    for (int p = 0; p < XPT; ++p) {
      for (int j = 0; j < 4; ++j) {
        x_cur[p][j] = static_cast<float>(xs[p][j]);
      }
      tail_cur[p] = s < STAGES ? exp(glast - gam[p]) : 0.0f;
    }
    if (s == 0) {
      decay = exp(glast);
    }
  }
  {  // fetch the next stage: A as (k, row group) items, consecutive lanes at consecutive k
     // (coalesced), so that a float4 holds 4 rows at one column; B as (row, k group) items; and X
    const int it2 = it + 1;
    const int s2 = it2 % (2 * STAGES);
    const int n2 = REVERSE ? N - 1 - it2 / (2 * STAGES) : it2 / (2 * STAGES);
    if (it2 < total) {
      const int c2 = (s2 % STAGES) * CB;
      const uint base = ((uint)(n2 * R + r) * C + c2) * K;
      if (s2 < STAGES) {
        for (int p = 0; p < SPT; ++p) {
          const int e = (int)tid + THREADS * p;
          const int k = e % K, rg = e / K;
          for (int a = 0; a < 4; ++a) {
            staged_a[p][a] = e < K * RG ? A[base + (4 * rg + a) * K + k] : static_cast<AT>(0.0f);
          }
        }
        const uint g_at = (uint)(n2 * R + r) * C;
        glast = gamma[g_at + C - 1];
        for (int p = 0; p < XPT; ++p) {
          const int e = (int)tid + THREADS * p;
          const int c = c2 + e / VG, g = e % VG;
          gam[p] = e < CB * VG ? gamma[g_at + c] : 0.0f;
          for (int j = 0; j < 4; ++j) {
            const int v = vt + 4 * g + j;
            xs[p][j] = e < CB * VG && v < V ? X[((uint)(n2 * R + r) * C + c) * V + v] : static_cast<XT>(0.0f);
          }
        }
      } else {
        for (int p = 0; p < SPT; ++p) {
          const int e = (int)tid + THREADS * p;
          const int cc = e / KG, kg = e % KG;
          for (int a = 0; a < 4; ++a) {
            const bool inside = e < CB * KG && 4 * kg + a < K;
            staged_b[p][a] = inside ? Bm[base + cc * K + 4 * kg + a] : static_cast<BT>(0.0f);
          }
        }
      }
    }
  }
  if (it < 0) {
    continue;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (s < STAGES) {
    // x = X + s A h for rows c0 ... c0 + CB. item = split * TILES + tile: a warp's lanes share the
    // split and walk the tiles
    const int c0 = s * CB;
    for (int i = 0; i < TPT; ++i) {
      const int item = (int)tid + THREADS * i;
      if (item < TILES * KS) {
        const int tile = item % TILES;
        const int rg = tile / VG, tc = tile % VG;
        const int k0 = (item / TILES) * KSPAN;
        const int k1 = k0 + KSPAN < K ? k0 + KSPAN : K;
        float acc[4][4];
        for (int a = 0; a < 4; ++a) {
          for (int j = 0; j < 4; ++j) {
            acc[a][j] = 0.0f;
          }
        }
        for (int k = k0; k < k1; ++k) {
          const float4 av = m_s[k * RG + (ROTATE ? (rg + k / SH) % RG : rg)];
          const float4 hv = h_s[k * VG + tc];
          const float ar[4] = {av.x, av.y, av.z, av.w};
          const float hr[4] = {hv.x, hv.y, hv.z, hv.w};
          for (int a = 0; a < 4; ++a) {
            for (int j = 0; j < 4; ++j) {
              acc[a][j] += ar[a] * hr[j];
            }
          }
        }
        for (int a = 0; a < 4; ++a) {
          const float4 t = make_float4(acc[a][0], acc[a][1], acc[a][2], acc[a][3]);
          p_s[((item / TILES) * CB + 4 * rg + a) * VG + tc] = t;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int p = 0; p < XPT; ++p) {
      const int e = (int)tid + THREADS * p;
      if (e < CB * VG) {
        const int c = c0 + e / VG, g = e % VG;
        float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int ks = 0; ks < KS; ++ks) {
          const float4 t = p_s[(ks * CB + e / VG) * VG + g];
          sum[0] += t.x;
          sum[1] += t.y;
          sum[2] += t.z;
          sum[3] += t.w;
        }
        // k's rows as Kt's: backward A h's rows, forward x's rows as B^T multiplies them
        const float tail = tail_cur[p];
        float x[4];
        for (int j = 0; j < 4; ++j) {
          const int v = vt + 4 * g + j;
          x[j] = v < V ? x_cur[p][j] + SIGN * (REVERSE ? tail * sum[j] : sum[j]) : 0.0f;
          if (v < V) {
            x_new[(nr * C + c) * V + v] = static_cast<StateT>(x[j]);
          }
          x[j] = REVERSE ? x[j] : tail * x[j];
        }
        const float4 t = make_float4(x[0], x[1], x[2], x[3]);
        x_s[c * VG + g] = t;
      }
    }
  } else {
    // h' -= s B^T x for rows c0 ... c0 + CB, on this thread's rows
    const int c0 = (s - STAGES) * CB;
    for (int cc = 0; cc < CB; ++cc) {
      const float4 xv = x_s[(c0 + cc) * VG + cg];
      const float xr[4] = {-SIGN * xv.x, -SIGN * xv.y, -SIGN * xv.z, -SIGN * xv.w};
      for (int i = 0; i < KGPT; ++i) {
        const int kg = slot + SLOTS * i;
        if (kg < KG) {
          const float4 bv = m_s[cc * KG + kg];
          const float br[4] = {bv.x, bv.y, bv.z, bv.w};
          for (int a = 0; a < 4; ++a) {
            for (int j = 0; j < 4; ++j) {
              h[i][a][j] += br[a] * xr[j];
            }
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (s == 2 * STAGES - 1) {
      // h_s is read again only after the next stage's barrier
      for (int i = 0; i < KGPT; ++i) {
        for (int a = 0; a < 4; ++a) {
          const int k = 4 * (slot + SLOTS * i) + a;
          const float4 t = make_float4(h[i][a][0], h[i][a][1], h[i][a][2], h[i][a][3]);
          if (k < K) {
            h_s[k * VG + cg] = t;
          }
        }
      }
      if (seg_end[n] >= 0) {
        const uint base = (seg_end[n] * R + r) * K;
        for (int i = 0; i < KGPT; ++i) {
          for (int a = 0; a < 4; ++a) {
            const int k = 4 * (slot + SLOTS * i) + a;
            for (int j = 0; j < 4; ++j) {
              if (k < K && v0 + j < V) {
                h_out[(base + k) * V + v0 + j] = h[i][a][j];
              }
            }
          }
        }
      }
    }
  }
}
