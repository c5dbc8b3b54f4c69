// Host check of the CUDA attention kernels' index math (csrc/common/attention_index.h), compiled
// with the host compiler by tests/test_cuda_attention_index.py (no GPU needed):
//  - dropout_keep_pair agrees with dropout_keep (the CPU op's predicate) element by element;
//  - the causal block ranges cover exactly the visible keys / queries;
//  - the shared-memory swizzle is a bijection and every ldmatrix phase hits 8 different 16-byte
//    bank groups;
//  - ldmatrix (emulated from the PTX ISA's description) from a swizzled tile with the lane maps
//    ldsm_*_lane yields exactly the mma.m16n8k16 A / B fragments of the PTX ISA's "Matrix
//    Fragments for mma.m16n8k16 with floating point type", and the C fragment maps (mma_c_row /
//    mma_c_col) compose into the A fragment as attention_mma.cuh's acc_to_a assumes.
// Prints "ok" and exits 0, or prints the first failure and exits 1.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common/attention_index.h"
#include "host_check.h"

using namespace aiayn;

static void check_dropout_pair() {
  const double ps[] = {0.0, 0.1, 0.5, 0.9, 1.0};
  for (double p : ps) {
    const DropoutParams d = make_dropout_params(p, 0x123456789abcdefULL, 0);
    for (uint64_t e = 0; e < 4096; ++e) {
      const uint32_t bits = dropout_keep_pair(d, e);
      CHECK((bits & 1u) == static_cast<uint32_t>(dropout_keep(d, e)), "p=%g e=%llu bit 0", p, (unsigned long long)e);
      CHECK(((bits >> 1) & 1u) == static_cast<uint32_t>(dropout_keep(d, e + 1)), "p=%g e=%llu bit 1", p, (unsigned long long)e);
    }
    // Far counters (past 2^32 elements: the counter's high word).
    for (uint64_t e = (uint64_t{1} << 34) - 9; e < (uint64_t{1} << 34) + 9; ++e) {
      const uint32_t bits = dropout_keep_pair(d, e);
      CHECK(bits == (static_cast<uint32_t>(dropout_keep(d, e)) | static_cast<uint32_t>(dropout_keep(d, e + 1)) << 1),
            "p=%g far e", p);
    }
  }
  // Element numbering: row-major over (B, H, Lq, Lk).
  CHECK(attention_dropout_element(0, 0, 0, 5, 7) == 0, "origin");
  CHECK(attention_dropout_element(2 * 3 + 1, 4, 6, 5, 7) == (uint64_t)(((2 * 3 + 1) * 5 + 4) * 7 + 6), "row-major");
}

static void check_causal_blocks() {
  for (int64_t lq = 1; lq < 200; lq += 7)
    for (int64_t lk = 1; lk < 200; lk += 5)
      for (int64_t bq : {32, 64})
        for (int64_t bk : {64}) {
          const int64_t nkb = (lk + bk - 1) / bk;
          for (int64_t i0 = 0; i0 < lq; i0 += bq) {
            const int64_t n = attention_key_blocks(true, i0, bq, bk, nkb);
            // Every visible key (j <= i for some row i of the block) is inside the blocks, and the
            // last block holds a visible key.
            const int64_t last_row = i0 + bq - 1;
            const int64_t last_visible = last_row < lk - 1 ? last_row : lk - 1;
            CHECK(n * bk > last_visible && (n - 1) * bk <= last_visible, "key blocks lq=%lld lk=%lld i0=%lld",
                  (long long)lq, (long long)lk, (long long)i0);
            CHECK(attention_key_blocks(false, i0, bq, bk, nkb) == nkb, "non-causal");
          }
          for (int64_t j0 = 0; j0 < lk; j0 += bk) {
            const int64_t q0 = attention_first_query_block(true, j0, bq);
            // Block q0 holds row j0 (the first that sees key j0); earlier blocks see none of these keys.
            CHECK(q0 * bq <= j0 && j0 < (q0 + 1) * bq, "first query block j0=%lld", (long long)j0);
          }
        }
}

// --- ldmatrix / mma fragments -----------------------------------------------------------------

struct Elem {
  int row, col;
};

// The tile as the kernels store it (load_tile_async): element (r, c) at smem_offset(r, c / 8) + c % 8.
struct Tile {
  int rows, cols, chunks;
  std::vector<Elem> smem;
  Tile(int r, int c) : rows(r), cols(c), chunks(c / 8), smem(static_cast<size_t>(r) * c, Elem{-1, -1}) {
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < c; ++j) {
        const int off = smem_offset(i, j / 8, chunks) + j % 8;
        CHECK(off >= 0 && off < r * c, "offset in range");
        CHECK(smem[off].row == -1, "swizzle bijection: (%d, %d) collides", i, j);
        smem[off] = Elem{i, j};
      }
  }
  // ldmatrix.x4 (PTX ISA: "each thread receives 2 consecutive 16-bit elements": thread t gets row
  // t / 4, elements 2 (t % 4) and 2 (t % 4) + 1 of matrix q; with .trans, elements (2 (t % 4) + u,
  // t / 4)). Lane l supplies the row address of row l % 8 of matrix l / 8.
  Elem ldsm(RowCol (*map)(int), int row0, int col0, int q, int t, int u, bool trans) const {
    const int rr = trans ? 2 * (t % 4) + u : t / 4;
    const int cc = trans ? t / 4 : 2 * (t % 4) + u;
    const RowCol rc = map(8 * q + rr);
    const int off = smem_offset(row0 + rc.row, (col0 + rc.col) / 8, chunks) + cc;
    return smem[off];
  }
  // Bank group (16 bytes of a 128-byte line) of lane l's row address.
  int bank_group(RowCol (*map)(int), int row0, int col0, int lane) const {
    const RowCol rc = map(lane);
    return (smem_offset(row0 + rc.row, (col0 + rc.col) / 8, chunks) * 2 / 16) % 8;
  }
};

static void check_fragments(int D) {
  const Tile tile(64, D);
  for (int row0 = 0; row0 < 64; row0 += 16)
    for (int col0 = 0; col0 < D; col0 += 16)
      for (int t = 0; t < 32; ++t) {
        const int g = t / 4, tig = t % 4;
        for (int q = 0; q < 4; ++q)
          for (int u = 0; u < 2; ++u) {
            // A (16 x 16, row-major, stored row = m): a_q holds (g + 8 (q % 2), 2 tig + u + 8 (q / 2)).
            Elem e = tile.ldsm(ldsm_a_lane, row0, col0, q, t, u, false);
            CHECK(e.row == row0 + g + 8 * (q & 1) && e.col == col0 + 2 * tig + u + 8 * (q >> 1),
                  "A D=%d lane %d reg %d", D, t, q);
            // B (16 x 8, k x n) of n-tile q / 2, register b_{q % 2}: (k, n) = (2 tig + u + 8 (q % 2), g).
            const int k = 2 * tig + u + 8 * (q & 1), n = g + 8 * (q >> 1);
            e = tile.ldsm(ldsm_b_lane, row0, col0, q, t, u, false);  // stored row = n, col = k
            CHECK(e.row == row0 + n && e.col == col0 + k, "B D=%d lane %d reg %d", D, t, q);
            e = tile.ldsm(ldsm_bt_lane, row0, col0, q, t, u, true);  // stored row = k, col = n
            CHECK(e.row == row0 + k && e.col == col0 + n, "B trans D=%d lane %d reg %d", D, t, q);
          }
      }
  // Each ldmatrix phase (one 8x8 matrix: 8 row addresses) touches 8 different bank groups.
  RowCol (*maps[])(int) = {ldsm_a_lane, ldsm_b_lane, ldsm_bt_lane};
  for (auto map : maps)
    for (int row0 = 0; row0 < 64; row0 += 16)
      for (int col0 = 0; col0 < D; col0 += 16)
        for (int q = 0; q < 4; ++q) {
          unsigned seen = 0;
          for (int r = 0; r < 8; ++r) seen |= 1u << tile.bank_group(map, row0, col0, 8 * q + r);
          CHECK(seen == 0xFFu, "bank conflict D=%d row0=%d col0=%d matrix %d: groups %02x", D, row0, col0, q, seen);
        }
}

static void check_accumulator_to_a() {
  // acc_to_a: A register q, half u comes from accumulator tile q / 2 (columns 8 (q / 2) ..), element
  // 2 (q % 2) + u. Its (row, col) there must be the A layout's (g + 8 (q % 2), 2 tig + u + 8 (q / 2)).
  for (int t = 0; t < 32; ++t)
    for (int q = 0; q < 4; ++q)
      for (int u = 0; u < 2; ++u) {
        const int e = 2 * (q & 1) + u;
        const int row = mma_c_row(t, e), col = 8 * (q >> 1) + mma_c_col(t, e);
        CHECK(row == t / 4 + 8 * (q & 1) && col == 2 * (t % 4) + u + 8 * (q >> 1), "C->A lane %d reg %d", t, q);
      }
  // The C layout itself (PTX: c0, c1 at row groupID, c2, c3 at groupID + 8; column 2 tig + (i % 2)).
  for (int t = 0; t < 32; ++t)
    for (int e = 0; e < 4; ++e)
      CHECK(mma_c_row(t, e) == t / 4 + (e >= 2 ? 8 : 0) && mma_c_col(t, e) == (t % 4) * 2 + (e & 1), "C layout");
}

int main() {
  check_dropout_pair();
  check_causal_blocks();
  for (int D : {32, 64, 128}) check_fragments(D);
  check_accumulator_to_a();
  return check_report();
}
