// The chunked forward's output (chunk.py's _output), a threadgroup per chunk of one value head (and
// tile of value columns):
//   O = diag(e^gamma) Q S + P U
// with S the state entering the chunk (K x V), P = tril(Q K^T * Gam) (C x C) and U the chunk's new
// values (C x V). On 8x8 SIMD-group matrices, transposed so that no product is a right factor:
// a threadgroup computes BV of the V value columns, and its SIMD group sg columns 16 sg ... 16 sg + 15
// of those (two 8-row tiles of O^T, one pair a product).
// Every SIMD group multiplies by all of Q and P, so those (and S) are staged in threadgroup memory,
// read from device memory once and in whole rows (8x8 tiles read from device memory by every SIMD
// group made the kernel L1-bound: H100, 1.04 ms at (8, 2048, 32) against 0.83 for MLX's GEMMs).
// 1. (Q S)^T = S^T Q^T, KS rows of S and columns of Q a stage; summed into registers;
// 2. stored into o_s (O's layout, float) and its rows scaled by e^gamma element-wise (fla scales its
//    float q h the same way, after the product: no rounding of Q e^gamma or of Q S in between);
// 3. each SIMD group takes its tiles back as accumulators and adds U^T P^T (P staged; its 8x8
//    blocks up to the diagonal);
// 4. o_s written out in OutT, row by row: chunk-major, or (ROWS) straight into token rows, which
//    saves the layout kernel's pass over o and a [T, HV, V] copy (H100, sixteenth session: the
//    forward as fast as with the layout kernel, within the noise).
// Threadgroup memory is one buffer x_s: the stages of step 1, then o_s, then P (while the sums are
// in registers), then o_s again.
// For bfloat16 inputs on CUDA the header defines GDN_MMA_BF16 (factors rounded to bfloat16, float
// sums), as fla's output kernel rounds q, h, P and v_new.
// Grid (THREADS * M, V / BV, 1), threadgroup (THREADS, 1, 1), THREADS = 32 BV / 16: threadgroup
// (m, t) is chunk m, value columns t BV ... (t + 1) BV - 1. Template: K (a multiple of 8), V, BV (a
// multiple of 16 dividing V), C (of 8), THREADS, OutT, QT, ST, PT (the types of q, the states and P),
// KS (a multiple of 8) and the row strides of
// the staged arrays: SST (S rows, >= BV), QST (Q rows, >= KS), OST (o_s, >= BV), PST (P, >= C)
// (padded on CUDA against bank conflicts); ROWS and HV (value heads: chunk m is (n B + b) HV + h).
// Inputs: q [M,C,K]; states [M,K,V]; P [M,C,C] (any float type); u [M,C,V] (float, or bfloat16 on
// CUDA: a SIMD-group load from device memory); gamma [M,C] float32; with ROWS, src [N C] int32 (the
// token at padded position p of a batch row, or -1: kernels.rows_to_chunks' map) and dims [2] int32:
// B, T (read at run time: no new kernel for each length).
// Output: o [M,C,V] OutT, or with ROWS [B,T,HV,V].
constexpr int CT = C / 8;  // 8-row tiles of a chunk
constexpr int STAGE = KS * SST + C * QST;
constexpr int AFTER = C * (OST > PST ? OST : PST);
threadgroup float x_s[STAGE > AFTER ? STAGE : AFTER];
threadgroup float eg_s[C];
threadgroup int t_s[C];  // ROWS: the token of each row of the chunk, or -1
constexpr int QS = KS * SST;  // the stage's Q rows after its S rows
constexpr int S_ITEMS = (KS * BV + THREADS - 1) / THREADS;  // a thread's loads of a stage's S, Q, and of P
constexpr int Q_ITEMS = (C * KS + THREADS - 1) / THREADS;
constexpr int P_ITEMS = (C * C + THREADS - 1) / THREADS;
const uint tid = thread_position_in_threadgroup.x;
const int v0 = 16 * (int)simdgroup_index_in_threadgroup;  // in the threadgroup's columns
const uint m = threadgroup_position_in_grid.x;
const uint vt = threadgroup_position_in_grid.y * BV;  // the threadgroup's first column
const uint hv = m % HV, b = m / HV % dims[0], n = m / HV / dims[0];  // ROWS: chunk n of batch row b
for (int c = (int)tid; c < C; c += THREADS) {
  eg_s[c] = exp(gamma[m * C + c]);
  t_s[c] = ROWS ? src[n * C + c] : -1;
}

// 1. (Q S)^T: tiles (value rows v0 + 8 h, chunk columns 8 i), h = 0 in acc, h = 1 in acc2
const simdgroup_float8x8 zero = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
simdgroup_float8x8 acc[CT], acc2[CT];
#pragma unroll
for (int i = 0; i < CT; ++i) {
  acc[i] = zero;
  acc2[i] = zero;
}
for (int k0 = 0; k0 < K; k0 += KS) {
  const int ks = K - k0 < KS ? K - k0 : KS;  // a multiple of 8
  // the stage's loads all issued before the barrier, kept as loaded, then converted into x_s (one
  // load, wait and store after another left the kernel waiting on memory: ncu, sixteenth session)
  ST s_r[S_ITEMS];
  QT q_r[Q_ITEMS];
#pragma unroll
  for (int i = 0; i < S_ITEMS; ++i) {
    const int e = (int)tid + i * THREADS;
    if (e < ks * BV) {
      s_r[i] = states[(m * K + k0 + e / BV) * V + vt + e % BV];
    }
  }
#pragma unroll
  for (int i = 0; i < Q_ITEMS; ++i) {
    const int e = (int)tid + i * THREADS;
    if (e < C * KS && e % KS < ks) {
      q_r[i] = q[(m * C + e / KS) * K + k0 + e % KS];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the stage before is read
#pragma unroll
  for (int i = 0; i < S_ITEMS; ++i) {
    const int e = (int)tid + i * THREADS;
    if (e < ks * BV) {
      x_s[e / BV * SST + e % BV] = static_cast<float>(s_r[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < Q_ITEMS; ++i) {
    const int e = (int)tid + i * THREADS;
    if (e < C * KS && e % KS < ks) {
      x_s[QS + e / KS * QST + e % KS] = static_cast<float>(q_r[i]);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int kb = 0; kb < ks / 8; ++kb) {
    simdgroup_float8x8 st, st2;  // S^T's tiles (v0 .., 8 kb ..) and (v0 + 8 .., 8 kb ..)
    simdgroup_load_transposed(st, &x_s[kb * 8 * SST + v0], SST);
    simdgroup_load_transposed(st2, &x_s[kb * 8 * SST + v0 + 8], SST);
#pragma unroll
    for (int i = 0; i < CT; ++i) {
      simdgroup_float8x8 qt;  // Q^T's tile (8 kb .., 8 i ..)
      simdgroup_load_transposed(qt, &x_s[QS + i * 8 * QST + kb * 8], QST);
      simdgroup_multiply_accumulate_pair(acc[i], acc2[i], st, st2, qt);
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // the last stage is read: o_s and P go over it

// 2. into o_s, rows times e^gamma, back into registers
PT p_r[P_ITEMS];  // P's loads in flight through step 2 (staged after it, over o_s)
#pragma unroll
for (int i = 0; i < P_ITEMS; ++i) {
  const int e = (int)tid + i * THREADS;
  if (e < C * C) {
    p_r[i] = P[m * C * C + e];
  }
}
#pragma unroll
for (int i = 0; i < CT; ++i) {
  simdgroup_store_transposed(acc[i], &x_s[i * 8 * OST + v0], OST);
  simdgroup_store_transposed(acc2[i], &x_s[i * 8 * OST + v0 + 8], OST);
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int e = (int)tid; e < C * BV; e += THREADS) {
  x_s[e / BV * OST + e % BV] *= eg_s[e / BV];
}
threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma unroll
for (int i = 0; i < CT; ++i) {
  simdgroup_load_transposed(acc[i], &x_s[i * 8 * OST + v0], OST);
  simdgroup_load_transposed(acc2[i], &x_s[i * 8 * OST + v0 + 8], OST);
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // o_s is read: P goes over it
#pragma unroll
for (int i = 0; i < P_ITEMS; ++i) {
  const int e = (int)tid + i * THREADS;
  if (e < C * C) {
    x_s[e / C * PST + e % C] = static_cast<float>(p_r[i]);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. + U^T P^T: U^T's tile (v0 .., 8 j ..) times P^T's (8 j .., 8 i ..), j <= i
for (int j = 0; j < CT; ++j) {
  simdgroup_float8x8 ut, ut2;
  const uint u_at = (m * C + j * 8) * V + vt + v0;
  simdgroup_load_transposed(ut, &u[u_at], V);
  simdgroup_load_transposed(ut2, &u[u_at + 8], V);
#pragma unroll
  for (int i = 0; i < CT; ++i) {
    if (i >= j) {
      simdgroup_float8x8 pt;
      simdgroup_load_transposed(pt, &x_s[i * 8 * PST + j * 8], PST);
      simdgroup_multiply_accumulate_pair(acc[i], acc2[i], ut, ut2, pt);
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // P is read: o_s goes over it
#pragma unroll
for (int i = 0; i < CT; ++i) {
  simdgroup_store_transposed(acc[i], &x_s[i * 8 * OST + v0], OST);
  simdgroup_store_transposed(acc2[i], &x_s[i * 8 * OST + v0 + 8], OST);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 4. out
for (int e = (int)tid; e < C * BV; e += THREADS) {
  const int c = e / BV;
  const OutT x = static_cast<OutT>(x_s[c * OST + e % BV]);
  if (!ROWS) {
    o[(m * C + c) * V + vt + e % BV] = x;
  } else if (t_s[c] >= 0) {
    o[((b * dims[1] + t_s[c]) * HV + hv) * V + vt + e % BV] = x;
  }
}
