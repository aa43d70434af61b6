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
// Device memory is read and written 8 elements a thread at a time (gdn_load_vec8 / gdn_store_vec8:
// one 16-byte load where the scalar loads took eight, each with its own address; ncu, eighteenth
// session: the scalar staging held 24 values and addresses a thread and spilled them).
// 1. (Q S)^T = S^T Q^T, KS rows of S and columns of Q a stage, summed into registers; a stage's
//    loads are all issued while the stage before is multiplied (kept as loaded, converted into x_s
//    after the barrier), and P's and U's tiles while the last one is (U's tiles read one after
//    another, each waited on, had held every SIMD group: ncu, eighteenth session);
// 2. its columns (the chunk's rows) times e^gamma in the registers (fla scales its float q h the
//    same way, after the product: no rounding of Q e^gamma or of Q S in between); P staged over the
//    last stage;
// 3. + U^T P^T (P's 8x8 blocks up to the diagonal);
// 4. the sums stored into o_s (O's layout, float) and written out in OutT: chunk-major, or (ROWS)
//    straight into token rows, which saves the layout kernel's pass over o and a [T, HV, V] copy.
// For bfloat16 inputs on CUDA the header defines GDN_MMA_BF16 (factors rounded to bfloat16, float
// sums), as fla's output kernel rounds q, h, P and v_new.
// Grid (THREADS * M, V / BV, 1), threadgroup (THREADS, 1, 1), THREADS = 32 BV / 16: threadgroup
// (m, t) is chunk m, value columns t BV ... (t + 1) BV - 1. Template: K (a multiple of 8), V, BV (a
// multiple of 16 dividing V), C (of 8), THREADS, OutT, QT, ST, PT (the types of q, the states and P),
// KS (a multiple of 8) and the row strides of the staged arrays: SST (S rows, >= BV), QST (Q rows,
// >= KS), OST (o_s, >= BV), PST (P, >= C) (padded on CUDA against bank conflicts); ROWS and HV
// (value heads: chunk m is (n B + b) HV + h).
// Inputs: q [M,C,K]; states [M,K,V]; P [M,C,C] (any float type); u [M,C,V] (float, or bfloat16 on
// CUDA: a SIMD-group load from device memory); gamma [M,C] float32; with ROWS, src [N C] int32 (the
// token at padded position p of a batch row, or -1: kernels.rows_to_chunks' map) and dims [2] int32:
// B, T (read at run time: no new kernel for each length). q, the states, P and o are read and written
// 8 elements at a time.
// Output: o [M,C,V] OutT, or with ROWS [B,T,HV,V].
constexpr int CT = C / 8;  // 8-row tiles of a chunk
constexpr int STAGE = KS * SST + C * QST;
constexpr int AFTER = C * (OST > PST ? OST : PST);
threadgroup float x_s[STAGE > AFTER ? STAGE : AFTER];
threadgroup float eg_s[C];
threadgroup int t_s[C];  // ROWS: the token of each row of the chunk, or -1
constexpr int QS = KS * SST;  // the stage's Q rows after its S rows
// a thread's 8-element loads of a stage's S and Q, of P, and its 8-element stores of O
constexpr int S_VECS = (KS * BV / 8 + THREADS - 1) / THREADS;
constexpr int Q_VECS = (C * KS / 8 + THREADS - 1) / THREADS;
constexpr int P_VECS = (C * C / 8 + THREADS - 1) / THREADS;
constexpr int O_VECS = (C * BV / 8 + THREADS - 1) / THREADS;
const uint tid = thread_position_in_threadgroup.x;
const uint lane = thread_index_in_simdgroup;
const int v0 = 16 * (int)simdgroup_index_in_threadgroup;  // in the threadgroup's columns
const uint m = threadgroup_position_in_grid.x;
const uint vt = threadgroup_position_in_grid.y * BV;  // the threadgroup's first column
const uint rows_b = dims[0], rows_t = dims[1];  // read once (o's stores could alias dims for all
                                                // the compiler knows: it reloaded them every row)
const uint hv = m % HV, b = m / HV % rows_b, n = m / HV / rows_b;  // ROWS: chunk n of batch row b
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
constexpr int NS = (K + KS - 1) / KS;  // stages
gdn_vec8<ST> s_r[S_VECS];
gdn_vec8<QT> q_r[Q_VECS];
gdn_vec8<PT> p_r[P_VECS];
simdgroup_float8x8 ut[CT], ut2[CT];  // U^T's tiles (v0 .., 8 j ..) and (v0 + 8 .., 8 j ..)
// iteration s: stage s's loads issued (in the last, P's and U's), stage s - 1 multiplied meanwhile,
// stage s stored into x_s
for (int s = 0; s <= NS; ++s) {
  const int k0 = s * KS, ks = K - k0 < KS ? K - k0 : KS;  // a multiple of 8
  if (s < NS) {
#pragma unroll
    for (int i = 0; i < S_VECS; ++i) {
      const int e = (int)tid + i * THREADS;  // row e / (BV / 8), columns 8 (e % (BV / 8)) + 0..7
      if (e < ks * BV / 8) {
        s_r[i] = gdn_load_vec8(&states[(m * K + k0 + e / (BV / 8)) * V + vt + e % (BV / 8) * 8]);
      }
    }
#pragma unroll
    for (int i = 0; i < Q_VECS; ++i) {
      const int e = (int)tid + i * THREADS;  // row e / (KS / 8), columns 8 (e % (KS / 8)) + 0..7
      if (e < C * KS / 8 && e % (KS / 8) * 8 < ks) {
        q_r[i] = gdn_load_vec8(&q[(m * C + e / (KS / 8)) * K + k0 + e % (KS / 8) * 8]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < P_VECS; ++i) {
      const int e = (int)tid + i * THREADS;  // row e / (C / 8), columns 8 (e % (C / 8)) + 0..7
      if (e < C * C / 8) {
        p_r[i] = gdn_load_vec8(&P[m * C * C + e * 8]);
      }
    }
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      const uint u_at = (m * C + j * 8) * V + vt + v0;
      simdgroup_load_transposed(ut[j], &u[u_at], V);
      simdgroup_load_transposed(ut2[j], &u[u_at + 8], V);
    }
  }
  if (s > 0) {
    const int kp = K - (k0 - KS) < KS ? K - (k0 - KS) : KS;  // the previous stage's rows
    for (int kb = 0; kb < kp / 8; ++kb) {
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
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous stage is read
  if (s < NS) {
#pragma unroll
    for (int i = 0; i < S_VECS; ++i) {
      const int e = (int)tid + i * THREADS;
      if (e < ks * BV / 8) {
        for (int j = 0; j < 8; ++j) {
          x_s[e / (BV / 8) * SST + e % (BV / 8) * 8 + j] = s_r[i].get(j);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < Q_VECS; ++i) {
      const int e = (int)tid + i * THREADS;
      if (e < C * KS / 8 && e % (KS / 8) * 8 < ks) {
        for (int j = 0; j < 8; ++j) {
          x_s[QS + e / (KS / 8) * QST + e % (KS / 8) * 8 + j] = q_r[i].get(j);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// 2. (Q S)^T's columns times e^gamma; P staged over the last stage
#pragma unroll
for (int i = 0; i < CT; ++i) {
  simdgroup_scale_columns(acc[i], &eg_s[8 * i], lane);
  simdgroup_scale_columns(acc2[i], &eg_s[8 * i], lane);
}
#pragma unroll
for (int i = 0; i < P_VECS; ++i) {
  const int e = (int)tid + i * THREADS;
  if (e < C * C / 8) {
    for (int j = 0; j < 8; ++j) {
      x_s[e / (C / 8) * PST + e % (C / 8) * 8 + j] = p_r[i].get(j);
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. + U^T P^T: U^T's tile (v0 .., 8 j ..) times P^T's (8 j .., 8 i ..), j <= i
#pragma unroll
for (int j = 0; j < CT; ++j) {
#pragma unroll
  for (int i = j; i < CT; ++i) {
    simdgroup_float8x8 pt;
    simdgroup_load_transposed(pt, &x_s[i * 8 * PST + j * 8], PST);
    simdgroup_multiply_accumulate_pair(acc[i], acc2[i], ut[j], ut2[j], pt);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // P is read: o_s goes over it
#pragma unroll
for (int i = 0; i < CT; ++i) {
  simdgroup_store_transposed(acc[i], &x_s[i * 8 * OST + v0], OST);
  simdgroup_store_transposed(acc2[i], &x_s[i * 8 * OST + v0 + 8], OST);
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 4. out, 8 columns a store
#pragma unroll
for (int i = 0; i < O_VECS; ++i) {
  const int e = (int)tid + i * THREADS;  // row e / (BV / 8), columns 8 (e % (BV / 8)) + 0..7
  const int c = e / (BV / 8), col = e % (BV / 8) * 8;
  if (e < C * BV / 8 && (!ROWS || t_s[c] >= 0)) {
    float x[8];
    for (int j = 0; j < 8; ++j) {
      x[j] = x_s[c * OST + col + j];
    }
    const uint row = ROWS ? (b * rows_t + t_s[c]) * HV + hv : m * C + c;
    gdn_store_vec8(&o[row * V + vt + col], x);
  }
}
