// (I + A)^-1 for strictly lower-triangular C x C matrices A (the WY transform's T of each chunk).
// Grid (C, M, 1), threadgroup (C, 1, 1): one threadgroup per matrix, one thread per column. Column
// col of T = (I + A)^-1 solves (I + A) t = e_col by forward substitution,
//   t_i = [i == col] - sum_{j < i} A_ij t_j,
// which touches no other column: after A is staged (all loads in flight at once), no thread waits
// for another. All threads walk the same j, so each A_ij read is a broadcast; t_j = 0 above the
// diagonal makes the shared loop exact.
// Template: C. Input: A [M, C, C] float32. Output: T [M, C, C] float32.
threadgroup float a_s[C * C];
const uint col = thread_position_in_threadgroup.x;
const uint base = threadgroup_position_in_grid.y * C * C;
float staged[C];
for (int i = 0; i < C; ++i) {
  staged[i] = A[base + i * C + col];
}
for (int i = 0; i < C; ++i) {
  a_s[i * C + col] = staged[i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);
float t[C];
for (int i = 0; i < C; ++i) {
  float ti = (uint)i == col ? 1.0f : 0.0f;
  for (int j = 0; j < i; ++j) {
    ti -= a_s[i * C + j] * t[j];
  }
  t[i] = ti;
  T[base + i * C + col] = ti;
}
