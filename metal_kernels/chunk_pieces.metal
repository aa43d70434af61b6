// The per-chunk pieces of the chunked gated delta rule (chunk.py's _ChunkPieces), one threadgroup per
// chunk of one value head, every product on SIMD-group 8x8 matrices. With gamma the within-chunk
// cumsum of g and Gam_ij = exp(gamma_i - gamma_j) for i >= j:
//   KKG = strict_tril(K K^T * Gam)     P = tril(Q K^T * Gam)     A = diag(beta) KKG
//   T = (I + A)^-1                     W = T diag(beta e^gamma) K     U = T diag(beta) V
// 1. K K^T and Q K^T, lower 8x8 tiles only, k summed over blocks of KC columns staged in x_s (q, k,
//    and k transposed: a right factor is loaded row-major).
// 2. The decay and masks applied element-wise; KKG and P written out; -A kept in y_s.
// 3. T in x_s by block forward substitution: the diagonal 8x8 blocks by one thread per column, then
//    block row by block row, T_ij = T_ii S_ij with S_ij = sum_{j <= b < i} (-A_ib) T_bj.
// 4. W and U, KC columns at a time: the scaled k or v block staged in y_s, T times it (lower blocks
//    only) into y_s's second half, written out.
// Grid (THREADS, M, 1), threadgroup (THREADS, 1, 1), THREADS >= C.
// Template: K, V, C (a multiple of 8), THREADS (a multiple of 32), KC (a multiple of 8), and the row
// strides of the threadgroup arrays (padded on CUDA against bank conflicts): CS (C x C, >= C), QS
// (staged rows, >= KC), TS (staged k^T, >= C).
// Inputs: q, k [M,C,K]; v [M,C,V]; gamma, beta [M,C] float32.
// Outputs: KKG, P, T [M,C,C]; W [M,C,K]; U [M,C,V].
constexpr int SG = THREADS / 32;
constexpr int NB = C / 8;                     // 8-row blocks of a chunk
constexpr int LT = NB * (NB + 1) / 2;         // lower-triangular 8x8 tiles of a C x C matrix
constexpr int IPS = (2 * LT + SG - 1) / SG;   // K K^T and Q K^T tiles per SIMD group
constexpr int JPS = (NB + SG - 1) / SG;       // blocks of one block row of T per SIMD group
constexpr int KCB = KC / 8;
constexpr int OPS = (NB * KCB + SG - 1) / SG; // W or U tiles per SIMD group and column block
constexpr int NKB = (K + KC - 1) / KC;        // column blocks of W, then of U
constexpr int NVB = (V + KC - 1) / KC;
constexpr int QOFF = 0, KOFF = C * QS, TOFF = 2 * C * QS;  // the stage of step 1 in x_s
constexpr int XSTAGE = 2 * C * QS + KC * TS;
constexpr int RX = XSTAGE > C * CS ? XSTAGE : C * CS;
constexpr int RY = C * CS > 2 * C * QS ? C * CS : 2 * C * QS;
threadgroup float x_s[RX];  // stage of q, k, k^T; then Q K^T; then T
threadgroup float y_s[RY];  // K K^T, then -A; then a staged k or v block and its product with T
const uint tid = thread_position_in_threadgroup.x;
const int sg = (int)simdgroup_index_in_threadgroup;
const uint m = threadgroup_position_in_grid.y;
const uint g0 = m * C;  // the chunk's first row in gamma, beta, q, k, v

// 1. K K^T (items < LT) and Q K^T
simdgroup_float8x8 acc[IPS];
int tile_i[IPS], tile_j[IPS];  // the block row and column of item sg + SG i (tile item % LT)
for (int i = 0; i < IPS; ++i) {
  acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  const int t = (sg + SG * i) % LT;
  tile_i[i] = 0;
  while ((tile_i[i] + 1) * (tile_i[i] + 2) / 2 <= t) {
    ++tile_i[i];
  }
  tile_j[i] = t - tile_i[i] * (tile_i[i] + 1) / 2;
}
for (int kc = 0; kc < K; kc += KC) {
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block's products are done
  for (int e = (int)tid; e < C * KC; e += THREADS) {
    const int c = e / KC, j = e % KC;
    const bool inside = kc + j < K;
    const float kv = inside ? k[(g0 + c) * K + kc + j] : 0.0f;
    x_s[QOFF + c * QS + j] = inside ? q[(g0 + c) * K + kc + j] : 0.0f;
    x_s[KOFF + c * QS + j] = kv;
    x_s[TOFF + j * TS + c] = kv;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int kk = 0; kk < KCB; ++kk) {  // the SIMD group's tiles side by side: independent products
    for (int i = 0; i < IPS; ++i) {
      const int item = sg + SG * i;
      if (item < 2 * LT) {
        simdgroup_float8x8 a, b;
        simdgroup_load(a, &x_s[(item < LT ? KOFF : QOFF) + tile_i[i] * 8 * QS + kk * 8], QS);
        simdgroup_load(b, &x_s[TOFF + kk * 8 * TS + tile_j[i] * 8], TS);
        simdgroup_multiply_accumulate(acc[i], a, b, acc[i]);
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // the stage is read: Q K^T goes over it
for (int i = 0; i < IPS; ++i) {
  const int item = sg + SG * i;
  if (item < 2 * LT) {
    simdgroup_store(acc[i], item < LT ? &y_s[tile_i[i] * 8 * CS + tile_j[i] * 8]
                                      : &x_s[tile_i[i] * 8 * CS + tile_j[i] * 8], CS);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. decay and masks (tiles above the diagonal were never stored: selected away, not multiplied)
for (int e = (int)tid; e < C * C; e += THREADS) {
  const int i = e / C, j = e % C;
  const float decay = i >= j ? exp(gamma[g0 + i] - gamma[g0 + j]) : 0.0f;
  const float kk = i > j ? y_s[i * CS + j] * decay : 0.0f;
  KKG[m * C * C + e] = kk;
  P[m * C * C + e] = i >= j ? x_s[i * CS + j] * decay : 0.0f;
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
for (int e = (int)tid; e < C * C; e += THREADS) {
  const int i = e / C, j = e % C;
  T[m * C * C + e] = i / 8 >= j / 8 ? x_s[i * CS + j] : 0.0f;
}

// 4. W = T (k * beta e^gamma), then U = T (v * beta), KC columns at a time
for (int blk = 0; blk < NKB + NVB; ++blk) {
  const bool is_w = blk < NKB;
  const int c0 = (is_w ? blk : blk - NKB) * KC, width = is_w ? K : V;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // -A, or the previous block, is no longer read
  for (int e = (int)tid; e < C * KC; e += THREADS) {
    const int c = e / KC, j = e % KC;
    float x = 0.0f;
    if (c0 + j < width) {
      const float b = beta[g0 + c];
      x = is_w ? k[(g0 + c) * K + c0 + j] * (b * exp(gamma[g0 + c])) : v[(g0 + c) * V + c0 + j] * b;
    }
    y_s[c * QS + j] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 sum[OPS];
  for (int i = 0; i < OPS; ++i) {
    sum[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  for (int b = 0; b < NB; ++b) {  // the SIMD group's tiles side by side: independent products
    for (int i = 0; i < OPS; ++i) {
      const int tile = sg + SG * i, bi = tile / KCB;
      if (tile < NB * KCB && b <= bi) {
        simdgroup_float8x8 a, x;
        simdgroup_load(a, &x_s[bi * 8 * CS + b * 8], CS);
        simdgroup_load(x, &y_s[b * 8 * QS + tile % KCB * 8], QS);
        simdgroup_multiply_accumulate(sum[i], a, x, sum[i]);
      }
    }
  }
  for (int i = 0; i < OPS; ++i) {
    const int tile = sg + SG * i;
    if (tile < NB * KCB) {
      simdgroup_store(sum[i], &y_s[(C + tile / KCB * 8) * QS + tile % KCB * 8], QS);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = (int)tid; e < C * KC; e += THREADS) {
    const int c = e / KC, j = e % KC;
    if (c0 + j < width) {
      const float w = y_s[(C + c) * QS + j];
      if (is_w) {
        W[(g0 + c) * K + c0 + j] = w;
      } else {
        U[(g0 + c) * V + c0 + j] = w;
      }
    }
  }
}
