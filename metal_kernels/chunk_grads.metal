// The backward's per-chunk work after the reverse scan (chunk.py's _backward_after_scan), one
// threadgroup per chunk of one value head. From the scan's du and the three products with the K x V
// states that stay MLX GEMMs (du_h = du h^T, dKt = u dh'^T, dQg = dO h^T), with T = (I + A)^-1,
// Gam_ij = exp(gamma_i - gamma_j) (i >= j), e^gamma and the tail decay e^(gamma_C - gamma):
//   dP  = tril(dO u^T)                         dPG = dP * Gam
//   dA  = strict(T^T (du_h W^T - du U^T))     dKK = dA * Gam * beta (rows)
//         (= -(dKb W^T + dVb U^T) with dKb = T^T dW, dW = -du_h, dVb = T^T du: no C x C x K product)
//   dv  = beta (T^T du)                        dq  = e^gamma dQg + dPG k
//   dk  = dPG^T q + beta e^gamma (T^T dW) + tail dKt + (dKK + dKK^T) k
//   dbeta, dg: row sums of the same terms, dg's suffix sums as in chunk.py (no rowsum - colsum).
// Phases (threadgroup memory: x_s and y_s, C x C each at most; the C x C tiles of dP, Z, dKK stay
// in registers between phases, one matrix at a time in threadgroup memory):
//   A. dP and Z = du_h W^T - du U^T on lower 4 x 4 register tiles, k (then v) summed over blocks of
//      KC columns staged transposed in x_s (as chunk_pieces.metal's K K^T).
//   Q. dPG in x_s, C/2 columns of q and of k at a time in y_s: dq written, dk = dPG^T q written.
//   B. T to x_s, Z to y_s; dA = strict(T^T Z) and dKK on the tiles; the C x C parts of dg and dbeta
//      through y_s (dA KKG transposed above its diagonal), parked in the dg and dbeta outputs.
//   V. C columns of du (then dW) at a time in y_s times T^T: dv written, beta e^gamma dKb + tail dKt
//      added to dk; the row sums of dbeta and dg reduced through x_s; dbeta and dg written.
//   S. dKK + dKK^T in x_s, C columns of k in y_s: added to dk.
// dk is read back by other threads between phases: those barriers order device memory too.
// Grid (THREADS * M, 1, 1), threadgroup (THREADS, 1, 1), THREADS >= C: threadgroup m is chunk m (the
// x dimension, as CUDA allows up to 2^31 - 1 blocks there and 65535 in y).
// Template: K, V, C (a multiple of 8), THREADS (a multiple of 32), KC (a multiple of 4), CS (row
// stride of x_s and y_s as C x C arrays, >= C), TS (row stride of phase A's staged blocks, >= C).
// Inputs: q, k, dQg, du_h, dKt, W [M,C,K]; v, dout, u, du, U [M,C,V] (q, k, v, u in any float
// type, the rest float32); T, KKG, P [M,C,C];
// gamma, beta [M,C]; dchunk [M] (the cotangent of the chunk's decay times it: decay sum(h * dh')).
// Outputs: dq, dk [M,C,K]; dv [M,C,V]; dg, dbeta [M,C].
constexpr int NT = C / 4;                     // 4-row groups of a chunk
constexpr int LT4 = NT * (NT + 1) / 2;        // lower-triangular 4x4 tiles of a C x C matrix
constexpr int IPT = (LT4 + THREADS - 1) / THREADS;  // C x C tiles per thread
constexpr int XG = C / 4;                     // 4-column groups of a C-wide block
constexpr int HG = C / 8;                     // 4-column groups of a C/2-wide block
constexpr int OPT = (NT * XG + THREADS - 1) / THREADS;  // V, S items per thread
constexpr int OPT2 = (2 * NT * HG + THREADS - 1) / THREADS;  // Q items (dq, then dk) per thread
constexpr int NKC = (K + KC - 1) / KC;        // phase A's blocks of k-sized rows, then v-sized
constexpr int NVC = (V + KC - 1) / KC;
constexpr int NKB = (K + C - 1) / C;          // C-wide column blocks of k-sized rows
constexpr int NVB = (V + C - 1) / C;
constexpr int HW = C / 2;                     // Q's block width
constexpr int RX = 4 * KC * TS > C * CS ? 4 * KC * TS : C * CS;
threadgroup float x_s[RX];
threadgroup float y_s[C * CS];
const uint tid = thread_position_in_threadgroup.x;
const uint m = threadgroup_position_in_grid.x;
const uint g0 = m * C;  // the chunk's first row
const uint t0 = m * C * C;  // the chunk's C x C matrices

// A. lower tiles (ti, tj), ti >= tj, of Z and dP
float z_acc[IPT][4][4], p_acc[IPT][4][4];
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
      z_acc[i][a][b] = 0.0f;
      p_acc[i][a][b] = 0.0f;
    }
  }
}
// blocks of KC columns: first of k-sized rows (du_h, W), then of v-sized rows (du, U, dout, u),
// staged transposed: x_s[s * KC * TS + j * TS + c] is column j of row c of staged array s
for (int blk = 0; blk < NKC + NVC; ++blk) {
  const bool over_k = blk < NKC;
  const int base = (over_k ? blk : blk - NKC) * KC, width = over_k ? K : V;
  threadgroup_barrier(mem_flags::mem_threadgroup);  // the previous block's products are done
  for (int e = (int)tid; e < C * KC; e += THREADS) {
    const int c = e / KC, j = e % KC;
    const bool inside = base + j < width;
    if (over_k) {
      const uint at = (g0 + c) * K + base + j;
      x_s[j * TS + c] = inside ? du_h[at] : 0.0f;
      x_s[KC * TS + j * TS + c] = inside ? W[at] : 0.0f;
    } else {
      const uint at = (g0 + c) * V + base + j;
      x_s[j * TS + c] = inside ? du[at] : 0.0f;
      x_s[KC * TS + j * TS + c] = inside ? U[at] : 0.0f;
      x_s[2 * KC * TS + j * TS + c] = inside ? dout[at] : 0.0f;
      x_s[3 * KC * TS + j * TS + c] = inside ? static_cast<float>(u[at]) : 0.0f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < IPT; ++i) {
    if ((int)tid + THREADS * i < LT4) {
      const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
      for (int j = 0; j < KC; ++j) {
        float xa[4], yb[4];
        for (int a = 0; a < 4; ++a) {
          xa[a] = x_s[j * TS + ri + a];
          yb[a] = x_s[KC * TS + j * TS + rj + a];
        }
        const float sign = over_k ? 1.0f : -1.0f;
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            z_acc[i][a][b] += sign * xa[a] * yb[b];
          }
        }
        if (!over_k) {
          float oa[4], ub[4];
          for (int a = 0; a < 4; ++a) {
            oa[a] = x_s[2 * KC * TS + j * TS + ri + a];
            ub[a] = x_s[3 * KC * TS + j * TS + rj + a];
          }
          for (int a = 0; a < 4; ++a) {
            for (int b = 0; b < 4; ++b) {
              p_acc[i][a][b] += oa[a] * ub[b];
            }
          }
        }
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// Q. dPG in x_s (lower tiles, zeros above the diagonal inside them); q and k in y_s
for (int i = 0; i < IPT; ++i) {
  if ((int)tid + THREADS * i < LT4) {
    const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        const int row = ri + a, col = rj + b;
        x_s[row * CS + col] = row >= col ? p_acc[i][a][b] * exp(gamma[g0 + row] - gamma[g0 + col]) : 0.0f;
      }
    }
  }
}
for (int c0 = 0; c0 < K; c0 += HW) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = (int)tid; e < C * HW; e += THREADS) {
    const int c = e / HW, j = e % HW;
    const bool inside = c0 + j < K;
    y_s[e] = inside ? static_cast<float>(q[(g0 + c) * K + c0 + j]) : 0.0f;
    y_s[C * HW + e] = inside ? static_cast<float>(k[(g0 + c) * K + c0 + j]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < OPT2; ++i) {
    const int item = (int)tid + THREADS * i;
    if (item < 2 * NT * HG) {
      const bool is_q = item < NT * HG;  // dq's tiles, then dk's
      const int ti = (is_q ? item : item - NT * HG) / HG, cg = item % HG;
      float acc[4][4];
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          acc[a][b] = 0.0f;
        }
      }
      if (is_q) {  // dq rows 4 ti + a: sum_{j <= i} dPG[i][j] k[j]
        for (int j = 0; j < 4 * ti + 4; ++j) {
          float pa[4], kb[4];
          for (int a = 0; a < 4; ++a) {
            pa[a] = x_s[(4 * ti + a) * CS + j];
            kb[a] = y_s[C * HW + j * HW + 4 * cg + a];
          }
          for (int a = 0; a < 4; ++a) {
            for (int b = 0; b < 4; ++b) {
              acc[a][b] += pa[a] * kb[b];
            }
          }
        }
      } else {  // dk rows 4 ti + a: sum_{i >= j} dPG[i][j] q[i]
        for (int r = 4 * ti; r < C; ++r) {
          float pa[4], qb[4];
          for (int a = 0; a < 4; ++a) {
            pa[a] = x_s[r * CS + 4 * ti + a];
            qb[a] = y_s[r * HW + 4 * cg + a];
          }
          for (int a = 0; a < 4; ++a) {
            for (int b = 0; b < 4; ++b) {
              acc[a][b] += pa[a] * qb[b];
            }
          }
        }
      }
      for (int a = 0; a < 4; ++a) {
        const uint row = g0 + 4 * ti + a;
        const float eg = exp(gamma[row]);
        for (int b = 0; b < 4; ++b) {
          const int col = c0 + 4 * cg + b;
          if (col < K) {
            const uint at = row * K + col;
            if (is_q) {
              dq[at] = dQg[at] * eg + acc[a][b];
            } else {
              dk[at] = acc[a][b];
            }
          }
        }
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // x_s and y_s are read

// B. T to x_s, Z to y_s (lower tiles); dA = strict(T^T Z): T[r][i] = 0 for r < i, so r runs from
// the tile's first row; Z[r][j] is read only for r >= i > j, inside the stored lower tiles
for (int e = (int)tid; e < C * C; e += THREADS) {
  x_s[e / C * CS + e % C] = T[t0 + e];
}
for (int i = 0; i < IPT; ++i) {
  if ((int)tid + THREADS * i < LT4) {
    const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        y_s[(ri + a) * CS + rj + b] = z_acc[i][a][b];
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float dkk[IPT][4][4];
for (int i = 0; i < IPT; ++i) {
  const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
  for (int a = 0; a < 4; ++a) {
    for (int b = 0; b < 4; ++b) {
      z_acc[i][a][b] = 0.0f;  // now dA
    }
  }
  if ((int)tid + THREADS * i < LT4) {
    for (int r = ri; r < C; ++r) {
      float ta[4], zb[4];
      for (int a = 0; a < 4; ++a) {
        ta[a] = x_s[r * CS + ri + a];
        zb[a] = y_s[r * CS + rj + a];
      }
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          z_acc[i][a][b] += ta[a] * zb[b];
        }
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // Z is read
// M = dP * P + dA * A on y_s's lower triangle (zero diagonal), dA * KKG transposed above it
for (int i = 0; i < IPT; ++i) {
  const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
  for (int a = 0; a < 4; ++a) {
    const int row = ri + a;
    const float gi = gamma[g0 + row], bi = beta[g0 + row];
    for (int b = 0; b < 4; ++b) {
      const int col = rj + b;
      const bool below = row > col;
      const float da = below ? z_acc[i][a][b] : 0.0f;
      const float kkg = below ? KKG[t0 + row * C + col] : 0.0f;
      dkk[i][a][b] = below ? da * exp(gi - gamma[g0 + col]) * bi : 0.0f;
      if ((int)tid + THREADS * i < LT4 && row >= col) {
        y_s[row * CS + col] = below ? p_acc[i][a][b] * P[t0 + row * C + col] + da * (bi * kkg) : 0.0f;
        if (below) {
          y_s[col * CS + row] = da * kkg;
        }
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
// row i: M's exclusive prefix sums in place (entries j <= i); dA KKG's row sum from column i above
float kg_row = 0.0f;
if ((int)tid < C) {
  const int i = (int)tid;
  float run = 0.0f;
  for (int j = 0; j <= i; ++j) {
    const float mij = y_s[i * CS + j];
    y_s[i * CS + j] = run;
    run += mij;
  }
  for (int j = 0; j < i; ++j) {
    kg_row += y_s[j * CS + i];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
// row t: dg's block term sum_{i >= t} sum_{j < t} M_ij, parked in dg; dbeta's dA KKG term in dbeta
if ((int)tid < C) {
  const int t = (int)tid;
  float below = 0.0f;
  for (int i = t; i < C; ++i) {
    below += y_s[i * CS + t];
  }
  dg[g0 + t] = below;
  dbeta[g0 + t] = kg_row;
}

// V. C columns of du (blocks < NVB), then of dW = -du_h, staged in y_s; D = T^T X on 4 x 4 tiles
float part[OPT][4][4];  // row sums: [0] dVb v, [1] dKb k, [2] dQg q, [3] dKt k
for (int i = 0; i < OPT; ++i) {
  for (int s = 0; s < 4; ++s) {
    for (int a = 0; a < 4; ++a) {
      part[i][s][a] = 0.0f;
    }
  }
}
for (int blk = 0; blk < NVB + NKB; ++blk) {
  const bool is_v = blk < NVB;
  const int c0 = (is_v ? blk : blk - NVB) * C, width = is_v ? V : K;
  // y_s is read (and, before the first block, dk's first terms are written)
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  for (int e = (int)tid; e < C * C; e += THREADS) {
    const int c = e / C, j = e % C;
    float x = 0.0f;
    if (c0 + j < width) {
      x = is_v ? du[(g0 + c) * V + c0 + j] : -du_h[(g0 + c) * K + c0 + j];
    }
    y_s[c * CS + j] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < OPT; ++i) {
    const int item = (int)tid + THREADS * i;
    if (item < NT * XG) {
      const int ti = item / XG, cg = item % XG;
      float acc[4][4];
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          acc[a][b] = 0.0f;
        }
      }
      for (int r = 4 * ti; r < C; ++r) {
        float ta[4], xb[4];
        for (int a = 0; a < 4; ++a) {
          ta[a] = x_s[r * CS + 4 * ti + a];
          xb[a] = y_s[r * CS + 4 * cg + a];
        }
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            acc[a][b] += ta[a] * xb[b];
          }
        }
      }
      for (int a = 0; a < 4; ++a) {
        const uint row = g0 + 4 * ti + a;
        const float bi = beta[row];
        const float beg = bi * exp(gamma[row]), tail = exp(gamma[g0 + C - 1] - gamma[row]);
        for (int b = 0; b < 4; ++b) {
          const int col = c0 + 4 * cg + b;
          if (col < width) {
            if (is_v) {
              dv[row * V + col] = bi * acc[a][b];
              part[i][0][a] += acc[a][b] * static_cast<float>(v[row * V + col]);
            } else {
              const uint at = row * K + col;
              const float kv = static_cast<float>(k[at]), dkt = dKt[at];
              dk[at] += acc[a][b] * beg + dkt * tail;
              part[i][1][a] += acc[a][b] * kv;
              part[i][2][a] += dQg[at] * static_cast<float>(q[at]);
              part[i][3][a] += dkt * kv;
            }
          }
        }
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);  // T is read: x_s takes the row sums
for (int i = 0; i < OPT; ++i) {
  const int item = (int)tid + THREADS * i;
  if (item < NT * XG) {
    const int ti = item / XG, cg = item % XG;
    for (int s = 0; s < 4; ++s) {
      for (int a = 0; a < 4; ++a) {
        x_s[(s * C + 4 * ti + a) * XG + cg] = part[i][s][a];
      }
    }
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float dgamma = 0.0f, zkt = 0.0f;
if ((int)tid < C) {
  const int i = (int)tid;
  float sums[4];
  for (int s = 0; s < 4; ++s) {
    sums[s] = 0.0f;
    for (int cg = 0; cg < XG; ++cg) {
      sums[s] += x_s[(s * C + i) * XG + cg];
    }
  }
  const float eg = exp(gamma[g0 + i]), bi = beta[g0 + i];
  dbeta[g0 + i] += sums[0] + eg * sums[1];
  dgamma = eg * sums[2] + bi * eg * sums[1];
  zkt = exp(gamma[g0 + C - 1] - gamma[g0 + i]) * sums[3];
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if ((int)tid < C) {
  y_s[tid] = dgamma;
  y_s[C + tid] = zkt;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if ((int)tid < C) {
  const int t = (int)tid;
  float sum = dchunk[m];
  for (int i = 0; i < C; ++i) {
    sum += i >= t ? y_s[i] : y_s[C + i];
  }
  dg[g0 + t] += sum;
}

// S. dKK + dKK^T in x_s (each lower tile and its mirror; zero diagonal), k in y_s
threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);  // dk updated, x_s, y_s read
for (int i = 0; i < IPT; ++i) {
  if ((int)tid + THREADS * i < LT4) {
    const int ri = 4 * tile_i[i], rj = 4 * tile_j[i];
    for (int a = 0; a < 4; ++a) {
      for (int b = 0; b < 4; ++b) {
        const int row = ri + a, col = rj + b;
        if (row > col) {
          x_s[row * CS + col] = dkk[i][a][b];
          x_s[col * CS + row] = dkk[i][a][b];
        } else if (row == col) {
          x_s[row * CS + col] = 0.0f;
        }
      }
    }
  }
}
for (int c0 = 0; c0 < K; c0 += C) {
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = (int)tid; e < C * C; e += THREADS) {
    const int c = e / C, j = e % C;
    y_s[c * CS + j] = c0 + j < K ? static_cast<float>(k[(g0 + c) * K + c0 + j]) : 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < OPT; ++i) {
    const int item = (int)tid + THREADS * i;
    if (item < NT * XG) {
      const int ti = item / XG, cg = item % XG;
      float acc[4][4];
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          acc[a][b] = 0.0f;
        }
      }
      for (int r = 0; r < C; ++r) {
        float sa[4], kb[4];
        for (int a = 0; a < 4; ++a) {
          sa[a] = x_s[(4 * ti + a) * CS + r];
          kb[a] = y_s[r * CS + 4 * cg + a];
        }
        for (int a = 0; a < 4; ++a) {
          for (int b = 0; b < 4; ++b) {
            acc[a][b] += sa[a] * kb[b];
          }
        }
      }
      for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
          const int col = c0 + 4 * cg + b;
          if (col < K) {
            dk[(g0 + 4 * ti + a) * K + col] += acc[a][b];
          }
        }
      }
    }
  }
}
