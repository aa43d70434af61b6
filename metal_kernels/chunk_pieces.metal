// The per-chunk pieces of the chunked gated delta rule (chunk.py's _ChunkPieces), one threadgroup per
// chunk of one value head. With gamma the within-chunk cumsum of g and Gam_ij = exp(gamma_i -
// gamma_j) for i >= j:
//   KKG = strict_tril(K K^T * Gam)     P = tril(Q K^T * Gam)     A = diag(beta) KKG
//   T = (I + A)^-1                     W = T diag(beta e^gamma) K     U = T diag(beta) V
// 1. K K^T and Q K^T on 4 x 4 register tiles (lower tiles only; a thread's K K^T and Q K^T tiles
//    share their k reads), or with MMA on 8x8 matrices (lower blocks; a block's K K^T and Q K^T one
//    pair of products), k summed over blocks of KC columns of q and k staged transposed in x_s.
// 2. The decay and masks applied element-wise; KKG and P written out; -A kept in y_s.
// 3. T in x_s by block forward substitution: the diagonal 8x8 blocks by one thread per column, then
//    block row by block row on SIMD-group 8x8 matrices, T_ij = T_ii S_ij with
//    S_ij = sum_{j <= b < i} (-A_ib) T_bj.
// 4. W and U, C columns at a time: the scaled k or v block staged in y_s, T times it (lower 8x8
//    blocks only) on 4 x 4 register tiles, written out; or with MMA on 8x8 matrices, the results
//    staged over it and written out row by row.
// MMA: steps 1 and 4 on 8x8 products, for kernels built with BF16 products (kernels.pieces_mma: the
// forward's, bfloat16 inputs on CUDA; as fla's kkt and w/u kernels, factors in bfloat16, float sums).
// Step 3's products are exact (FP64 on CUDA) in every mode: the inverse stays at float precision.
// Grid (THREADS * M, 1, 1), threadgroup (THREADS, 1, 1), THREADS >= C: threadgroup m is chunk m (the
// x dimension, as CUDA allows up to 2^31 - 1 blocks there and 65535 in y).
// Template: K, V, C (a multiple of 8), THREADS (a multiple of 32), KC (a multiple of 8), the row
// strides of the threadgroup arrays (padded on CUDA against bank conflicts): CS (C x C, >= C), TS
// (staged q^T and k^T, >= C), ALL_PIECES: KKG and T are written only with it (the forward needs
// P, W and U; the backward all five), and PT, WT: the types P and W are written in (float, or
// bfloat16 where the forward's one reader of each rounds its factors to bfloat16 anyway); V_ROWS
// and HV: v is read from token rows (the forward's: no layout pass over v; chunk m is
// (n B + b) HV + h); WU: step 4 runs here (else W and U are not written, and T is, in TT: the
// caller multiplies, kernels.PIECES_WU); MMA (above); QInT, KInT, VInT: the types of q, k, v.
// Where K and V are multiples of 8, q, k, v, W and U are read and written 8 elements a thread at a
// time (gdn_load_vec8 / gdn_store_vec8: one 16-byte access where scalar ones took eight, each waited
// on in turn: ncu, eighteenth session); P and KKG always.
// The row starts of v are kept in registers, not threadgroup memory: Metal's 32 KB at C = 64 is
// filled by the two C x C arrays (a C-element array beside them did not fit; test_metal_source.py).
// Inputs: q, k [M,C,K]; v [M,C,V], or with V_ROWS [B,T,HV,V] (any float type); gamma, beta [M,C]
// float32; src [N C] int32 and dims [2] int32 (B, T), read only with V_ROWS: the token at each
// padded position of a batch row, or -1 (kernels.rows_to_chunks' map).
// Outputs: KKG, P, T [M,C,C] (P in PT, T in TT); W [M,C,K] (WT); U [M,C,V].
constexpr int SG = THREADS / 32;
constexpr int NB = C / 8;                     // 8-row blocks of a chunk
constexpr int NT = C / 4;                     // 4-row groups of a chunk
constexpr int LT4 = NT * (NT + 1) / 2;        // lower-triangular 4x4 tiles of a C x C matrix
constexpr int IPT = (LT4 + THREADS - 1) / THREADS;  // K K^T (and Q K^T) tiles per thread
constexpr int JPS = (NB + SG - 1) / SG;       // blocks of one block row of T (MMA: column blocks of
                                              // W or U) per SIMD group
constexpr int XG = C / 4;                     // 4-column groups of a staged k or v block (C wide)
constexpr int OPT = (NT * XG + THREADS - 1) / THREADS;  // W or U tiles per thread and block
constexpr int LB = NB * (NB + 1) / 2;         // MMA: lower-triangular 8x8 blocks of a C x C matrix
constexpr int BPS = (LB + SG - 1) / SG;       // MMA: K K^T (and Q K^T) blocks per SIMD group
constexpr int HALF = (NB + 1) / 2;            // MMA: step 4 pairs T's block rows ti and ti + HALF
constexpr int NKB = (K + C - 1) / C;          // column blocks of W, then of U
constexpr int NVB = (V + C - 1) / C;
constexpr int QT = 0, KT = KC * TS;           // the stage of step 1 in x_s: q^T, k^T
constexpr bool VEC = K % 8 == 0 && V % 8 == 0;  // rows of q, k, v, W, U 8 elements a load or store
constexpr int QK_VECS = (C * KC / 8 + THREADS - 1) / THREADS;  // a thread's loads of a stage of q (of k)
constexpr int X_VECS = (C * C / 8 + THREADS - 1) / THREADS;  // of a k or v block; its stores of W or U
constexpr int RX = 2 * KC * TS > C * CS ? 2 * KC * TS : C * CS;
threadgroup float x_s[RX];  // stage of q^T, k^T; then Q K^T; then T
threadgroup float y_s[C * CS];  // K K^T, then -A; then a staged k or v block
const uint tid = thread_position_in_threadgroup.x;
const int sg = (int)simdgroup_index_in_threadgroup;
const uint m = threadgroup_position_in_grid.x;
const uint g0 = m * C;  // the chunk's first row in gamma, beta, q, k (and v unless V_ROWS)
const uint hv = m % HV, bv = m / HV % dims[0], nv = m / HV / dims[0];  // V_ROWS: chunk nv of row bv, head hv
const simdgroup_float8x8 zero = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
// where each row of the thread's step-4 vectors starts in v (V_ROWS: its token row, ~0u for padding)
uint v_at[X_VECS];
for (int i = 0; i < X_VECS; ++i) {
  const int c = ((int)tid + i * THREADS) / (C / 8), t = V_ROWS && c < C ? src[nv * C + c] : 0;
  v_at[i] = !V_ROWS ? (g0 + c) * V : t < 0 ? ~0u : ((bv * dims[1] + t) * HV + hv) * V;
}

// 1. K K^T and Q K^T, lower tiles or blocks only. SIMT: thread tile (ti, tj), ti >= tj, rows 4 ti + a,
// columns 4 tj + b. MMA: SIMD group sg takes the lower 8x8 blocks sg, sg + SG, ... (block bi, bj:
// rows 8 bi ..., columns 8 bj ...); a pair of products shares the right factor, K^T's block.
float kk_acc[MMA ? 1 : IPT][4][4], qk_acc[MMA ? 1 : IPT][4][4];
simdgroup_float8x8 kk_mma[MMA ? BPS : 1], qk_mma[MMA ? BPS : 1];
const int tiles = MMA ? BPS : IPT;
int tile_i[MMA ? BPS : IPT], tile_j[MMA ? BPS : IPT];
const int first = MMA ? sg : (int)tid, stride = MMA ? SG : THREADS, count = MMA ? LB : LT4;
#pragma unroll
for (int i = 0; i < tiles; ++i) {
  const int t = first + stride * i < count ? first + stride * i : 0;
  tile_i[i] = 0;
  while ((tile_i[i] + 1) * (tile_i[i] + 2) / 2 <= t) {
    ++tile_i[i];
  }
  tile_j[i] = t - tile_i[i] * (tile_i[i] + 1) / 2;
  if (MMA) {
    kk_mma[i] = zero;
    qk_mma[i] = zero;
  } else {
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        kk_acc[i][a][b] = 0.0f;
        qk_acc[i][a][b] = 0.0f;
      }
    }
  }
}
for (int kc = 0; kc < K; kc += KC) {
  if (VEC) {  // row c = e % C, columns 8 (e / C) + 0..7 (consecutive lanes: rows, so the transposed
             // stores meet no bank twice); all loads issued before the barrier
    gdn_vec8<QInT> q_r[QK_VECS];
    gdn_vec8<KInT> k_r[QK_VECS];
#pragma unroll
    for (int i = 0; i < QK_VECS; ++i) {
      const int e = (int)tid + i * THREADS, c = e % C, j0 = e / C * 8;
      if (e < C * KC / 8 && kc + j0 < K) {
        q_r[i] = gdn_load_vec8(&q[(g0 + c) * K + kc + j0]);
        k_r[i] = gdn_load_vec8(&k[(g0 + c) * K + kc + j0]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block's products are done
#pragma unroll
    for (int i = 0; i < QK_VECS; ++i) {
      const int e = (int)tid + i * THREADS, c = e % C, j0 = e / C * 8;
      if (e < C * KC / 8) {
        const bool inside = kc + j0 < K;
        for (int j = 0; j < 8; ++j) {
          x_s[QT + (j0 + j) * TS + c] = inside ? q_r[i].get(j) : 0.0f;
          x_s[KT + (j0 + j) * TS + c] = inside ? k_r[i].get(j) : 0.0f;
        }
      }
    }
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block's products are done
    for (int e = (int)tid; e < C * KC; e += THREADS) {
      const int c = e / KC, j = e % KC;
      const bool inside = kc + j < K;
      x_s[QT + j * TS + c] = inside ? static_cast<float>(q[(g0 + c) * K + kc + j]) : 0.0f;
      x_s[KT + j * TS + c] = inside ? static_cast<float>(k[(g0 + c) * K + kc + j]) : 0.0f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma unroll
  for (int i = 0; i < tiles; ++i) {
    if (first + stride * i >= count) {
      continue;
    }
    if (MMA) {
      for (int kb = 0; kb < KC / 8; ++kb) {
        simdgroup_float8x8 ka, qa, kt;  // K's and Q's blocks (bi, kb), K^T's (kb, bj)
        simdgroup_load_transposed(ka, &x_s[KT + kb * 8 * TS + 8 * tile_i[i]], TS);
        simdgroup_load_transposed(qa, &x_s[QT + kb * 8 * TS + 8 * tile_i[i]], TS);
        simdgroup_load(kt, &x_s[KT + kb * 8 * TS + 8 * tile_j[i]], TS);
        simdgroup_multiply_accumulate_pair(kk_mma[i], qk_mma[i], ka, qa, kt);
      }
    } else {
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
#pragma unroll
for (int i = 0; i < tiles; ++i) {
  if (first + stride * i >= count) {
    continue;
  }
  if (MMA) {
    simdgroup_store(kk_mma[i], &y_s[8 * tile_i[i] * CS + 8 * tile_j[i]], CS);
    simdgroup_store(qk_mma[i], &x_s[8 * tile_i[i] * CS + 8 * tile_j[i]], CS);
  } else {
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

// 2. decay and masks (tiles above the diagonal were never stored: selected away, not multiplied),
// row i, columns 8 (e % (C / 8)) + 0..7 a thread
for (int e = (int)tid; e < C * C / 8; e += THREADS) {
  const int i = e / (C / 8), j0 = e % (C / 8) * 8;
  float kk[8], p[8];
  for (int jj = 0; jj < 8; ++jj) {
    const int j = j0 + jj;
    const float decay = i >= j ? exp(gamma[g0 + i] - gamma[g0 + j]) : 0.0f;
    kk[jj] = i > j ? y_s[i * CS + j] * decay : 0.0f;
    p[jj] = i >= j ? x_s[i * CS + j] * decay : 0.0f;
    y_s[i * CS + j] = -beta[g0 + i] * kk[jj];
  }
  if (ALL_PIECES) {
    gdn_store_vec8(&KKG[m * C * C + e * 8], kk);
  }
  gdn_store_vec8(&P[m * C * C + e * 8], p);
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
        simdgroup_multiply_accumulate_exact(s, a, t, s);
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
      simdgroup_multiply_accumulate_exact(tij, tii, s, tij);
      simdgroup_store(tij, &x_s[bi * 8 * CS + j * 8], CS);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
for (int e = (int)tid; e < (ALL_PIECES || !WU ? C * C : 0); e += THREADS) {
  const int i = e / C, j = e % C;
  T[m * C * C + e] = static_cast<TT>(i / 8 >= j / 8 ? x_s[i * CS + j] : 0.0f);
}

// 4. W = T (k * beta e^gamma), then U = T (v * beta), C columns at a time. MMA: SIMD group sg takes
// the column blocks sg, sg + SG, ... of the staged block, all its 8x8 blocks, summed over T's blocks
// up to the diagonal; the results go over the staged block (once every SIMD group has read it) and
// out row by row. Else a thread's tile has rows 4 ti + a and columns 4 cg + b of the block, summed
// over the 8x8 blocks of T up to the diagonal
for (int blk = 0; blk < (WU ? NKB + NVB : 0); ++blk) {
  const bool is_w = blk < NKB;
  const int c0 = (is_w ? blk : blk - NKB) * C, width = is_w ? K : V;
  if (VEC) {  // row c = e / (C / 8), columns 8 (e % (C / 8)) + 0..7; all loads before the barrier
    gdn_vec8<KInT> k_r[X_VECS];
    gdn_vec8<VInT> v_r[X_VECS];
#pragma unroll
    for (int i = 0; i < X_VECS; ++i) {
      const int e = (int)tid + i * THREADS, c = e / (C / 8), j0 = e % (C / 8) * 8;
      if (e < C * C / 8 && c0 + j0 < width) {
        if (is_w) {
          k_r[i] = gdn_load_vec8(&k[(g0 + c) * K + c0 + j0]);
        } else if (v_at[i] != ~0u) {
          v_r[i] = gdn_load_vec8(&v[v_at[i] + c0 + j0]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // -A, or the previous block, is no longer read
#pragma unroll
    for (int i = 0; i < X_VECS; ++i) {
      const int e = (int)tid + i * THREADS, c = e / (C / 8), j0 = e % (C / 8) * 8;
      if (e < C * C / 8) {
        const bool inside = c0 + j0 < width && (is_w || v_at[i] != ~0u);
        const float b = beta[g0 + c], scale = is_w ? b * exp(gamma[g0 + c]) : b;
        for (int j = 0; j < 8; ++j) {
          y_s[c * CS + j0 + j] = inside ? (is_w ? k_r[i].get(j) : v_r[i].get(j)) * scale : 0.0f;
        }
      }
    }
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // -A, or the previous block, is no longer read
    for (int e = (int)tid; e < C * C; e += THREADS) {
      const int c = e / C, j = e % C;
      const int t = V_ROWS ? src[nv * C + c] : 0;  // (the row start, as v_at above)
      const uint row = !V_ROWS ? (g0 + c) * V : t < 0 ? ~0u : ((bv * dims[1] + t) * HV + hv) * V;
      float x = 0.0f;
      if (c0 + j < width && (is_w || row != ~0u)) {
        const float b = beta[g0 + c];
        x = is_w ? static_cast<float>(k[(g0 + c) * K + c0 + j]) * (b * exp(gamma[g0 + c]))
                 : static_cast<float>(v[row + c0 + j]) * b;
      }
      y_s[c * CS + j] = x;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (MMA) {
    simdgroup_float8x8 acc[JPS][NB];
#pragma unroll
    for (int i = 0; i < JPS; ++i) {
      const int cj = sg + SG * i;
#pragma unroll
      for (int ti = 0; ti < NB; ++ti) {
        acc[i][ti] = zero;
      }
      if (cj < NB) {
        for (int bb = 0; bb < NB; ++bb) {
          simdgroup_float8x8 xb;  // the staged block's (bb, cj)
          simdgroup_load(xb, &y_s[bb * 8 * CS + 8 * cj], CS);
#pragma unroll
          for (int ti = 0; ti < HALF; ++ti) {  // T's blocks (ti, bb) and (ti + HALF, bb): a pair where
            const int t2 = ti + HALF;           // both are on or below the diagonal
            simdgroup_float8x8 tb, tb2;
            if (t2 < NB && t2 >= bb) {
              simdgroup_load(tb2, &x_s[t2 * 8 * CS + bb * 8], CS);
            }
            if (ti >= bb) {
              simdgroup_load(tb, &x_s[ti * 8 * CS + bb * 8], CS);
              if (t2 < NB) {
                simdgroup_multiply_accumulate_pair(acc[i][ti], acc[i][t2], tb, tb2, xb);
              } else {
                simdgroup_multiply_accumulate(acc[i][ti], tb, xb, acc[i][ti]);
              }
            } else if (t2 < NB && t2 >= bb) {
              simdgroup_multiply_accumulate(acc[i][t2], tb2, xb, acc[i][t2]);
            }
          }
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the staged block is read: the results go over it
#pragma unroll
    for (int i = 0; i < JPS; ++i) {
      const int cj = sg + SG * i;
      if (cj < NB) {
#pragma unroll
        for (int ti = 0; ti < NB; ++ti) {
          simdgroup_store(acc[i][ti], &y_s[ti * 8 * CS + 8 * cj], CS);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (VEC) {  // row c = e / (C / 8), columns 8 (e % (C / 8)) + 0..7 a store
#pragma unroll
      for (int i = 0; i < X_VECS; ++i) {
        const int e = (int)tid + i * THREADS, c = e / (C / 8), j0 = e % (C / 8) * 8;
        if (e < C * C / 8 && c0 + j0 < width) {
          float x[8];
          for (int j = 0; j < 8; ++j) {
            x[j] = y_s[c * CS + j0 + j];
          }
          if (is_w) {
            gdn_store_vec8(&W[(g0 + c) * K + c0 + j0], x);
          } else {
            gdn_store_vec8(&U[(g0 + c) * V + c0 + j0], x);
          }
        }
      }
    } else {
      for (int e = (int)tid; e < C * C; e += THREADS) {
        const int c = e / C, col = c0 + e % C;
        if (col < width) {
          if (is_w) {
            W[(g0 + c) * K + col] = static_cast<WT>(y_s[c * CS + e % C]);
          } else {
            U[(g0 + c) * V + col] = y_s[c * CS + e % C];
          }
        }
      }
    }
  } else {
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
}
