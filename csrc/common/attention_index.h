// Index math of the CUDA attention kernels that can be checked on the host: the dropout element
// numbering (the same as the CPU op's), causal block ranges, the shared-memory swizzle and the
// lane -> (row, col) maps of ldmatrix / mma.sync m16n8k16 fragments. Plain C++ with
// AIAYN_HOST_DEVICE, no torch and no CUDA header, so tests/cpp/attention_index_check.cpp compiles
// it with the host compiler and checks it against the PTX ISA's fragment layouts.
#pragma once
#include <cstdint>

#include "dropout.h"

namespace aiayn {

// Dropout element number of score (b, h, i, j) of the (B, H, Lq, Lk) probability matrix, row-major:
// ((b * H + h) * Lq + i) * Lk + j, with bh = b * H + h.
AIAYN_HOST_DEVICE uint64_t attention_dropout_element(int64_t bh, int64_t i, int64_t j, int64_t len_q, int64_t len_k) {
  return static_cast<uint64_t>((bh * len_q + i) * len_k + j);
}

// Keep-bits of dropout elements e0 (bit 0) and e0 + 1 (bit 1), the same answers as dropout_keep
// (common/dropout.h) with one Philox call unless the pair straddles two counters (e0 % 4 == 3).
// Words are picked with selects, not a run-time array index (which would go to local memory).
AIAYN_HOST_DEVICE uint32_t dropout_keep_pair(const DropoutParams& d, uint64_t e0) {
  if (!d.enabled) return 3u;
  if (d.scale == 0.0) return 0u;  // p >= 1
  const Philox4x32 w = philox_words(d.seed, d.stream, e0 >> 2);
  const unsigned k = static_cast<unsigned>(e0 & 3u);
  const uint32_t first = k == 0 ? w.v[0] : k == 1 ? w.v[1] : k == 2 ? w.v[2] : w.v[3];
  uint32_t second;
  if (k == 3) second = philox_words(d.seed, d.stream, (e0 >> 2) + 1).v[0];
  else second = k == 0 ? w.v[1] : k == 1 ? w.v[2] : w.v[3];
  return static_cast<uint32_t>(first >= d.threshold) | (static_cast<uint32_t>(second >= d.threshold) << 1);
}

// Key blocks of `block_k` keys that query rows [i0, i0 + rows) can see: all `key_blocks` of them, or
// under the causal mask (key j visible iff j <= i) those up to the last row's diagonal.
AIAYN_HOST_DEVICE int64_t attention_key_blocks(bool causal, int64_t i0, int64_t rows, int64_t block_k,
                                               int64_t key_blocks) {
  if (!causal) return key_blocks;
  const int64_t need = (i0 + rows - 1) / block_k + 1;
  return need < key_blocks ? need : key_blocks;
}

// First query block of `block_q` rows with a row that sees key j0 under the causal mask (i >= j0).
AIAYN_HOST_DEVICE int64_t attention_first_query_block(bool causal, int64_t j0, int64_t block_q) {
  return causal ? j0 / block_q : 0;
}

// Shared-memory tiles of 16-bit elements hold rows of `chunks` 16-byte chunks (chunks = D / 8: 4, 8
// or 16). Chunk c of row r is stored at chunk position c ^ swizzle(r) of that row, so that the 8
// rows an ldmatrix phase reads (one chunk each, same c) fall in 8 different 16-byte bank groups of
// a 128-byte line: with 8 or 16 chunks a row spans whole lines and r % 8 picks the group; with 4
// chunks two rows share a line, so rows r and r + 1 differ in the line half and r / 2 picks the rest.
AIAYN_HOST_DEVICE int smem_swizzle(int row, int chunks) {
  return chunks >= 8 ? (row & 7) : ((row >> 1) & (chunks - 1));
}

// Element offset of (row, chunk) in such a tile.
AIAYN_HOST_DEVICE int smem_offset(int row, int chunk, int chunks) {
  return (row * chunks + (chunk ^ smem_swizzle(row, chunks))) * 8;
}

struct RowCol {
  int row, col;
};

// ldmatrix.x4: lane l supplies the address of row (l % 8) of 8x8 matrix l / 8; register q of every
// thread then comes from matrix q. These maps give, for each lane, the (row, col) of the 8-element
// row it points at inside a 16 x 16 tile at (0, 0):
//  - A operand (16 rows m x 16 cols k, stored row = m): matrices (m 0-7, k 0-7), (m 8-15, k 0-7),
//    (m 0-7, k 8-15), (m 8-15, k 8-15) = registers a0..a3 of mma.m16n8k16.
AIAYN_HOST_DEVICE RowCol ldsm_a_lane(int lane) { return {lane & 15, (lane >> 4) * 8}; }
//  - B operand of two n-tiles from a tile stored row = n, contiguous k (K for Q K^T; ldmatrix
//    without .trans): matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) =
//    b0, b1 of n-tile 0 and b0, b1 of n-tile 1.
AIAYN_HOST_DEVICE RowCol ldsm_b_lane(int lane) { return {(lane & 7) + ((lane >> 4) << 3), ((lane >> 3) & 1) * 8}; }
//  - B operand of two n-tiles from a tile stored row = k, contiguous n (V for P V; ldmatrix.trans):
//    matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
AIAYN_HOST_DEVICE RowCol ldsm_bt_lane(int lane) { return {lane & 15, (lane >> 4) * 8}; }

// Accumulator (C / D) fragment of mma.m16n8k16 with f32 accumulation: element e (0..3) of `lane`
// is row lane / 4 (+ 8 for e >= 2), column 2 * (lane % 4) + e % 2 of the 16 x 8 tile.
AIAYN_HOST_DEVICE int mma_c_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
AIAYN_HOST_DEVICE int mma_c_col(int lane, int e) { return 2 * (lane & 3) + (e & 1); }

}  // namespace aiayn
