// The per-chunk pieces of the chunked gated delta rule (chunk.py's _ChunkPieces), one threadgroup per
// chunk of one value head. With gamma the within-chunk cumsum of g and Gam_ij = exp(gamma_i -
// gamma_j) for i >= j:
//   KKG = strict_tril(K K^T * Gam)     P = tril(Q K^T * Gam)     A = diag(beta) KKG
//   T = (I + A)^-1                     W = T diag(beta e^gamma) K     U = T diag(beta) V
// 1. K K^T and Q K^T on 4 x 4 register tiles (lower tiles only; a thread's K K^T and Q K^T tiles
//    share their k reads), k summed over blocks of KC columns of q and k staged transposed in x_s.
// 2. The decay and masks applied element-wise; KKG and P written out; -A kept in y_s.
// 3. T in x_s by block forward substitution: the diagonal 8x8 blocks by one thread per column, then
//    block row by block row on SIMD-group 8x8 matrices, T_ij = T_ii S_ij with
//    S_ij = sum_{j <= b < i} (-A_ib) T_bj.
// 4. W and U, C columns at a time: the scaled k or v block staged in y_s, T times it (lower 8x8
//    blocks only) on 4 x 4 register tiles, written out.
// Grid (THREADS * M, 1, 1), threadgroup (THREADS, 1, 1), THREADS >= C: threadgroup m is chunk m (the
// x dimension, as CUDA allows up to 2^31 - 1 blocks there and 65535 in y).
// Template: K, V, C (a multiple of 8), THREADS (a multiple of 32), KC (a multiple of 8), the row
// strides of the threadgroup arrays (padded on CUDA against bank conflicts): CS (C x C, >= C), TS
// (staged q^T and k^T, >= C), ALL_PIECES: KKG and T are written only with it (the forward needs
// P, W and U; the backward all five), and PT, WT: the types P and W are written in (float, or
// bfloat16 where the forward's one reader of each rounds its factors to bfloat16 anyway); V_ROWS
// and HV: v is read from token rows (the forward's: no layout pass over v; chunk m is
// (n B + b) HV + h); WU: step 4 runs here (else W and U are not written, and T is, in TT: the
// caller multiplies, kernels.PIECES_WU).
// Inputs: q, k [M,C,K]; v [M,C,V], or with V_ROWS [B,T,HV,V] (any float type); gamma, beta [M,C]
// float32; src [N C] int32 and dims [2] int32 (B, T), read only with V_ROWS: the token at each
// padded position of a batch row, or -1 (kernels.rows_to_chunks' map).
// Outputs: KKG, P, T [M,C,C] (P in PT, T in TT); W [M,C,K] (WT); U [M,C,V].
constexpr int SG = THREADS / 32;
constexpr int NB = C / 8;                     // 8-row blocks of a chunk
constexpr int NT = C / 4;                     // 4-row groups of a chunk
constexpr int LT4 = NT * (NT + 1) / 2;        // lower-triangular 4x4 tiles of a C x C matrix
constexpr int IPT = (LT4 + THREADS - 1) / THREADS;  // K K^T (and Q K^T) tiles per thread
constexpr int JPS = (NB + SG - 1) / SG;       // blocks of one block row of T per SIMD group
constexpr int XG = C / 4;                     // 4-column groups of a staged k or v block (C wide)
constexpr int OPT = (NT * XG + THREADS - 1) / THREADS;  // W or U tiles per thread and block
constexpr int NKB = (K + C - 1) / C;          // column blocks of W, then of U
constexpr int NVB = (V + C - 1) / C;
constexpr int QT = 0, KT = KC * TS;           // the stage of step 1 in x_s: q^T, k^T
constexpr int RX = 2 * KC * TS > C * CS ? 2 * KC * TS : C * CS;
threadgroup float x_s[RX];  // stage of q^T, k^T; then Q K^T; then T
threadgroup float y_s[C * CS];  // K K^T, then -A; then a staged k or v block
threadgroup uint v_s[C];  // where each row of the chunk starts in v (V_ROWS: ~0u for padding)
const uint tid = thread_position_in_threadgroup.x;
const int sg = (int)simdgroup_index_in_threadgroup;
const uint m = threadgroup_position_in_grid.x;
const uint g0 = m * C;  // the chunk's first row in gamma, beta, q, k (and v unless V_ROWS)
for (int c = (int)tid; c < C; c += THREADS) {
  if (V_ROWS) {  // chunk n of batch row b, head h
    const uint h = m % HV, b = m / HV % dims[0], n = m / HV / dims[0];
    const int t = src[n * C + c];
    v_s[c] = t < 0 ? ~0u : ((b * dims[1] + t) * HV + h) * V;
  } else {
    v_s[c] = (g0 + c) * V;
  }
}

// 1. K K^T and Q K^T: thread tile (ti, tj), ti >= tj, rows 4 ti + a, columns 4 tj + b
float kk_acc[IPT][4][4], qk_acc[IPT][4][4];
int tile_i[IPT], tile_j[IPT];
for (int i = 0; i < IPT; ++i) {
  const int t = (int)tid + THREADS * i < LT4 ? (int)tid + THREADS * i : 0;
  tile_i[i] = 0;
  while ((tile_i[i] + 1) * (tile_i[i] + 2) / 2 <= t) {
    ++tile_i[i];
  }
  tile_j[i] = t - tile_i[i] * (tile_i[i] + 1) / 2;
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) {
      kk_acc[i][a][b] = 0.0f;
      qk_acc[i][a][b] = 0.0f;
    }
  }
}
for (int kc = 0; kc < K; kc += KC) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block's products are done
  for (int e = (int)tid; e < C * KC; e += THREADS) {
    const int c = e / KC, j = e % KC;
    const bool inside = kc + j < K;
    x_s[QT + j * TS + c] = inside ? static_cast<float>(q[(g0 + c) * K + kc + j]) : 0.0f;
    x_s[KT + j * TS + c] = inside ? static_cast<float>(k[(g0 + c) * K + kc + j]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < IPT; ++i) {
    if ((int)tid + THREADS * i < LT4) {
      const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
      for (int j = 0; j < KC; ++j) {
        float ka[4], qa[4], kb[4];
        for (int a = 0; a < 4; ++a) {
          ka[a] = x_s[KT + j * TS + ri + a];
          qa[a] = x_s[QT + j * TS + ri + a];
          kb[a] = x_s[KT + j * TS + rj + a];
        }
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            kk_acc[i][a][b] += ka[a] * kb[b];
            qk_acc[i][a][b] += qa[a] * kb[b];
          }
        }
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // the stage is read: Q K^T goes over it
for (int i = 0; i < IPT; ++i) {
  if ((int)tid + THREADS * i < LT4) {
    const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        y_s[(ri + a) * CS + rj + b] = kk_acc[i][a][b];
        x_s[(ri + a) * CS + rj + b] = qk_acc[i][a][b];
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. decay and masks (tiles above the diagonal were never stored: selected away, not multiplied)
for (int e = (int)tid; e < C * C; e += THREADS) {
  const int i = e / C, j = e % C;
  const float decay = i >= j ? exp(gamma[g0 + i] - gamma[g0 + j]) : 0.0f;
  const float kk = i > j ? y_s[i * CS + j] * decay : 0.0f;
  if (ALL_PIECES) {
    KKG[m * C * C + e] = kk;
  }
  P[m * C * C + e] = static_cast<PT>(i >= j ? x_s[i * CS + j] * decay : 0.0f);
  y_s[i * CS + j] = -beta[g0 + i] * kk;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. T = (I + A)^-1 into x_s: diagonal blocks (column col of its block by forward substitution;
// entries above the diagonal come out exactly 0), then the block rows below
if ((int)tid < C) {
  const int col = (int)tid, b0 = col / 8 * 8;
  float t[8];
  for (int r = 0; r < 8; ++r) {
    float ti = b0 + r == col ? 1.0f : 0.0f;
    for (int j = 0; j < r; ++j) {
      ti += y_s[(b0 + r) * CS + b0 + j] * t[j];
    }
    t[r] = ti;
    x_s[(b0 + r) * CS + col] = ti;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int bi = 1; bi < NB; ++bi) {
  for (int i = 0; i < JPS; ++i) {
    const int j = sg + SG * i;
    if (j < bi) {
      simdgroup_float8x8 s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int b = j; b < bi; ++b) {
        simdgroup_float8x8 a, t;
        simdgroup_load(a, &y_s[bi * 8 * CS + b * 8], CS);
        simdgroup_load(t, &x_s[b * 8 * CS + j * 8], CS);
        simdgroup_multiply_accumulate(s, a, t, s);
      }
      simdgroup_store(s, &x_s[bi * 8 * CS + j * 8], CS);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < JPS; ++i) {
    const int j = sg + SG * i;
    if (j < bi) {  // the product's operands are in the lanes when it completes: stored over S at once
      simdgroup_float8x8 tii, s, tij = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      simdgroup_load(tii, &x_s[bi * 8 * CS + bi * 8], CS);
      simdgroup_load(s, &x_s[bi * 8 * CS + j * 8], CS);
      simdgroup_multiply_accumulate(tij, tii, s, tij);
      simdgroup_store(tij, &x_s[bi * 8 * CS + j * 8], CS);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
for (int e = (int)tid; e < (ALL_PIECES || !WU ? C * C : 0); e += THREADS) {
  const int i = e / C, j = e % C;
  T[m * C * C + e] = static_cast<TT>(i / 8 >= j / 8 ? x_s[i * CS + j] : 0.0f);
}

// 4. W = T (k * beta e^gamma), then U = T (v * beta), C columns at a time; a thread's tile has rows
// 4 ti + a and columns 4 cg + b of the block, summed over the 8x8 blocks of T up to the diagonal
for (int blk = 0; blk < (WU ? NKB + NVB : 0); ++blk) {
  const bool is_w = blk < NKB;
  const int c0 = (is_w ? blk : blk - NKB) * C, width = is_w ? K : V;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // -A, or the previous block, is no longer read
  for (int e = (int)tid; e < C * C; e += THREADS) {
    const int c = e / C, j = e % C;
    float x = 0.0f;
    if (c0 + j < width && (is_w || v_s[c] != ~0u)) {
      const float b = beta[g0 + c];
      x = is_w ? static_cast<float>(k[(g0 + c) * K + c0 + j]) * (b * exp(gamma[g0 + c]))
               : static_cast<float>(v[v_s[c] + c0 + j]) * b;
    }
    y_s[c * CS + j] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < OPT; ++i) {
    const int item = (int)tid + THREADS * i;
    if (item < NT * XG) {
      const int ti = item / XG, cg = item % XG;
      const int bend = (ti / 2 + 1) * 8;  // T's rows 4 ti ... are zero right of their 8x8 diagonal block
      float acc[4][4];
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          acc[a][b] = 0.0f;
        }
      }
      for (int bb = 0; bb < bend; ++bb) {
        float ta[4], xb[4];
        for (int a = 0; a < 4; ++a) {
          ta[a] = x_s[(4 * ti + a) * CS + bb];
          xb[a] = y_s[bb * CS + 4 * cg + a];
        }
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            acc[a][b] += ta[a] * xb[b];
          }
        }
      }
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          const int col = c0 + 4 * cg + b;
          if (col < width) {
            if (is_w) {
              W[(g0 + 4 * ti + a) * K + col] = static_cast<WT>(acc[a][b]);
            } else {
              U[(g0 + 4 * ti + a) * V + col] = acc[a][b];
            }
          }
        }
      }
    }
  }
}
