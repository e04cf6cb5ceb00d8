// Packed tiles: the execution format of one tile-wise sparse layer (C++ side).
//
// The one C++ definition of the format that jax_tw/packing.py defines in Python; every kernel
// includes this header. For a kernel W (K, N), tile size G, C kept columns, T = ceil(C / G)
// tiles, R kept rows over all tiles and E residue weights:
//
//   columns        int32 [C]      kept output columns, ascending; tile t owns columns[t*G, (t+1)*G)
//   row_offsets    int32 [T + 1]  tile t's kept K indices are rows[row_offsets[t], row_offsets[t+1])
//   rows           int32 [R]      kept K indices, ascending within each tile
//   values         T_val [R, G]   values[r][j] = W[rows[r]][columns[t*G + j]]; row-major, G wide
//   residue_rows   int32 [E]      element-wise residue:
//   residue_cols   int32 [E]        W[residue_rows[e]][residue_cols[e]] += residue_values[e],
//   residue_values T_val [E]        sorted by (column, row): each column's weights are one run
//                                  (pack puts them outside the tiles; one inside adds to it)
//   tile_order     int32 [T]      the schedule, computed once by pack from columns and row_offsets
//   pruned         int32 [P]        (packing.schedule): tiles deepest first; the P = N - C pruned
//   pruned_offsets int32 [T + 1]    output columns, ascending; tile t's span of them, those
//                                   between tile t-1's last kept column and tile t's (the last
//                                   tile's span runs to N). The GPU kernels read it; the host
//                                   kernel finds its spans from the columns (Span, tw_kernel.h)
//
// Why values is [R, G] row-major: each tile's weights are one contiguous K_t x G block, the B
// operand of the tile's small dense GEMM, read one K row (G contiguous values) at a time by the
// micro-kernels; the last tile is padded to G so every tile has the same width.
//
// Validate() checks every index before a host kernel touches memory, so corrupt tiles give an
// error message instead of an out-of-bounds access. The host kernel checks the tiles' indices
// that way and the residue span by span, in the work items that read it (ResidueSound,
// tw_kernel_impl.cc). ValidateSizes() is the part that needs no index data: the CUDA handler (whose
// indices live on the GPU) runs it, and its kernels range-check each index they read.
#pragma once

#include <cstdint>
#include <climits>
#include <string>

// IndicesHold runs on every host call: on x86-64 it is also compiled for AVX-512 and AVX2, and
// the widest this CPU runs is chosen when the library loads (function multiversioning). At
// M = 1, TEW 75% + 5%, that made the call 1.09-1.14x faster than the SSE2 build alone
// (BUILD_NOTES.md).
#if defined(__x86_64__) && !defined(__CUDACC__) && !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11
#define JAX_TW_WIDEST_VECTORS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define JAX_TW_WIDEST_VECTORS
#endif

namespace jax_tw {

struct PackedTilesView {
  int64_t k = 0, n = 0, g = 0;  // static sizes: K, N, tile size G
  int64_t c = 0, t = 0, r = 0, e = 0;  // kept columns, tiles, kept rows, residue weights
  const int32_t* columns = nullptr;      // [c]
  const int32_t* row_offsets = nullptr;  // [t + 1]
  const int32_t* rows = nullptr;         // [r]
  const int32_t* residue_rows = nullptr; // [e]
  const int32_t* residue_cols = nullptr; // [e]
  // The schedule (GPU kernels only): np pruned columns.
  int64_t np = 0;
  const int32_t* tile_order = nullptr;      // [t]
  const int32_t* pruned = nullptr;          // [np]
  const int32_t* pruned_offsets = nullptr;  // [t + 1]

  int64_t depth(int64_t tile) const { return row_offsets[tile + 1] - row_offsets[tile]; }
  int64_t width(int64_t tile) const {
    int64_t w = c - tile * g;
    return w < g ? w : g;
  }

  // The view of a layer's index buffers (anything with element_count() and typed_data(), e.g.
  // XLA FFI buffers), without a residue; the sizes are taken from the buffers.
  template <class IndexBuffer>
  static PackedTilesView Of(int64_t k, int64_t n, int64_t g, IndexBuffer& columns,
                            IndexBuffer& row_offsets, IndexBuffer& rows) {
    PackedTilesView p;
    p.k = k;
    p.n = n;
    p.g = g;
    p.c = columns.element_count();
    p.t = row_offsets.element_count() - 1;
    p.r = rows.element_count();
    p.columns = columns.typed_data();
    p.row_offsets = row_offsets.typed_data();
    p.rows = rows.typed_data();
    return p;
  }

  // The checks that need only the sizes (the index arrays may live on a GPU): an empty string
  // if they hold, else what is wrong.
  std::string ValidateSizes() const {
    if (k <= 0 || n <= 0 || g <= 0) return "k, n and tile_size must be positive";
    if (c > n) return "more kept columns than n";
    if (t != (c + g - 1) / g)
      return "row_offsets has " + std::to_string(t + 1) + " entries, expected " +
             std::to_string((c + g - 1) / g + 1);
    return "";
  }

  // Every check, the indices included (host memory only): empty if the view is consistent;
  // with residue = false, all but the residue's (the host kernel's work items check the residue
  // they read; a call with no rows has none, and checks it here). The checks run once per call,
  // so they are first made in branch-free passes that the compiler vectorises (IndicesHold);
  // only corrupt tiles take the slower passes that say what is wrong (at M = 1 those took as
  // long as the product: 44% of the kernel's time with a 700k-weight residue).
  std::string Validate(bool residue = true) const {
    if (std::string bad = ValidateSizes(); !bad.empty()) return bad;
    if (IndicesHold(residue)) return "";
    return FirstBadIndex();
  }

  JAX_TW_WIDEST_VECTORS bool IndicesHold(bool residue) const {
    // v in [0, bound) in 32-bit compares (SSE2 has no 64-bit ones); a bound past the int32
    // range is clamped to it, which would refuse only the index 2^31 - 1.
    const auto below = [](int32_t v, int64_t bound) {
      return (v >= 0) & (v < static_cast<int32_t>(bound < INT32_MAX ? bound : INT32_MAX));
    };
    int ok = 1;
    for (int64_t i = 0; i < c; ++i) ok &= below(columns[i], n);
    for (int64_t i = 1; i < c; ++i) ok &= columns[i] > columns[i - 1];
    if (row_offsets[0] != 0 || row_offsets[t] != r) return false;
    for (int64_t i = 0; i < t; ++i) ok &= row_offsets[i + 1] >= row_offsets[i];
    if (!ok) return false;
    for (int64_t q = 0; q < r; ++q) ok &= below(rows[q], k);
    for (int64_t i = 0; i < t; ++i)
      for (int64_t q = row_offsets[i] + 1; q < row_offsets[i + 1]; ++q) ok &= rows[q] > rows[q - 1];
    if (!residue || !ok) return ok;
    return ResidueHolds(0, e, 0, n);  // one pass: the residue is the largest index array
  }

  // Whether residue weights [e0, e1) are sound for output columns [lo, hi): e0 <= e1, rows in
  // [0, k), columns in [lo, hi), (column, row) strictly increasing. The host kernel checks each
  // span's weights with it (ResidueSound, tw_kernel_impl.cc), IndicesHold the whole residue.
  // Branch-free, so that it vectorises; always inlined, so that each caller's instruction set
  // compiles its own copy.
  __attribute__((always_inline)) bool ResidueHolds(int64_t e0, int64_t e1, int64_t lo, int64_t hi) const {
    if (e0 > e1) return false;
    if (e0 == e1) return true;
    // v in [a, b) as the unsigned v - a < b - a; bounds past the int32 range clamped to it.
    const auto clamp = [](int64_t v) { return static_cast<uint32_t>(v < INT32_MAX ? v : INT32_MAX); };
    const uint32_t kk = clamp(k), base = static_cast<uint32_t>(lo), width = clamp(hi - lo);
    const int32_t *rr = residue_rows, *cc = residue_cols;
    int ok = (static_cast<uint32_t>(rr[e0]) < kk) & (static_cast<uint32_t>(cc[e0]) - base < width);
    for (int64_t i = e0 + 1; i < e1; ++i)
      ok &= (static_cast<uint32_t>(rr[i]) < kk) & (static_cast<uint32_t>(cc[i]) - base < width) &
            ((cc[i] > cc[i - 1]) | ((cc[i] == cc[i - 1]) & (rr[i] > rr[i - 1])));
    return ok;
  }

  // What IndicesHold found wrong: the first bad index, in words.
  std::string FirstBadIndex() const {
    for (int64_t i = 0; i < c; ++i) {
      if (columns[i] < 0 || columns[i] >= n) return "column index out of [0, n)";
      if (i && columns[i] <= columns[i - 1]) return "columns are not strictly increasing";
    }
    if (row_offsets[0] != 0 || row_offsets[t] != r) return "row_offsets must run from 0 to len(rows)";
    for (int64_t i = 0; i < t; ++i) {
      if (row_offsets[i + 1] < row_offsets[i]) return "row_offsets decrease";
      for (int64_t q = row_offsets[i]; q < row_offsets[i + 1]; ++q) {
        if (rows[q] < 0 || rows[q] >= k) return "row index out of [0, k)";
        if (q > row_offsets[i] && rows[q] <= rows[q - 1])
          return "rows are not strictly increasing within a tile";
      }
    }
    for (int64_t i = 0; i < e; ++i) {
      if (residue_rows[i] < 0 || residue_rows[i] >= k) return "residue row out of [0, k)";
      if (residue_cols[i] < 0 || residue_cols[i] >= n) return "residue column out of [0, n)";
      if (i && (residue_cols[i] < residue_cols[i - 1] ||
                (residue_cols[i] == residue_cols[i - 1] && residue_rows[i] <= residue_rows[i - 1])))
        return "residue is not sorted by (column, row) without repeats";
    }
    return "the indices are inconsistent";  // not reached: IndicesHold and these agree
  }
};

}  // namespace jax_tw
