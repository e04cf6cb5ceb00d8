// Host kernel for tile-wise matmul over packed tiles: y[M, N] = x[M, K] @ W_packed + bias, with
// W's element-wise residue, in f32 or x's dtype (f32 accumulation, one rounding at the end).
//
// The output columns are cut into spans, one per tile: span t runs from just after tile t-1's
// last kept column to tile t's last kept column (the last span to N), so it holds tile t's
// columns, the pruned columns among them and the residue weights of those columns (a layer
// with no tiles: spans of kBareSpan columns). A kernel
// computes tile t for a block of rows into a small buffer, then writes span t of those rows once
// (the epilogue): bias (or zero) in every column, plus the tile's result in its kept columns,
// plus the residue, converted to y's dtype. Every entry of y is written exactly once, by the
// work item that owns its rows and span; f32 outputs of kStreamBytes or more with non-temporal
// stores (y is never read).
//
// Calls with M <= kSmallRows (Few): work items are (tile, group of rows); each reads the packed
// values directly (G a multiple of the micro-tile width: f32, or bf16 widened as loaded in
// items of at most one micro-kernel's rows; else one f32 copy of the tile per item) and x's rows
// in place, summing blocks of rows x columns in registers; a residue
// reads x feature-major, transposed
// once per call (TransposeFew, tw_cpu.cc), with the walks of the many-rows path. Otherwise (Rows):
//  1. each tile's weights are copied into f32 micro-panels (contiguous KC x NR blocks), in
//     parallel over tiles (or, with one block of rows, by the one item that uses the tile, just
//     before it does: no pass over the pool of its own; bf16 at M = 33-64 1.1-1.9x, on
//     768 x 3072 0.89-1.44x by process, BUILD_NOTES.md);
//  2. work items are blocks of rows of x (and, when there are too few blocks to keep every
//     thread busy, ranges of tiles); each packs its rows into panels
//     (panel[q][i] = x[m0 + i][q], f32, zero past M: the MR values a micro-kernel needs at depth
//     q are contiguous whatever q is, so the K gather of every tile costs one index load per q,
//     fused into the micro-kernel's loads; f32 layers with few kept weights per column of x
//     skip the packing and read x's rows in place: kDirectWeightsPerK), then per tile runs a
//     register-blocked GEMM of the panels against the tile's weights and the span's epilogue
//     (layers deeper than kKBlock: the same a K block at a time, every tile's results kept until
//     the last block). The residue is vectorised over rows: when the layer has one, the item's
//     rows of x are also transposed feature-major (xt[q][i], a whole number of vectors per q;
//     bf16 x on AVX-512 as bf16, widened as it is loaded, in items of more than 8 rows), and
//     each residue weight is one load and FMA per vector of rows, in walks of up to 15 vectors
//     of rows. The walks are bound by the L2 cache's bandwidth: one line of xt per vector of
//     rows per weight (BUILD_NOTES.md).
// bf16 x on CPUs with AMX (variant avx512-amx) or AVX512-BF16 (variant avx512-bf16; RowsPairs in
// tw_kernel_impl.cc): step 1 copies each tile's weights transposed into 16 x 32 bf16 blocks, and
// step 2 transposes the item's rows of x in 32-bit pairs of K indices, gathers each tile's pairs
// at its kept K indices and runs the tile's GEMM on TDPBF16PS or VDPBF16PS (f32 sums); the same
// epilogue writes the spans.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "packed_tiles.h"

namespace jax_tw {

// The activation applied to y in the epilogue, after the bias (the values match the Python
// side's ops.ACTIVATIONS and the custom call's `activation` attribute).
enum class Activation : int64_t {
  kNone = 0,
  kRelu = 1,  // max(y, 0); NaN stays NaN
  kGelu = 2,  // y / 2 * (1 + erf(y / sqrt(2))), erf within 5e-7 (the rational form XLA uses for f32)
};

// The host kernel checks the residue span by span, in the work items that read it
// (ResidueSound, tw_kernel_impl.cc), rather than in a pass of its own before them (at M = 1,
// TEW 768 x 768 75% + 12.5%, that pass had 27% of the kernel's samples; BUILD_NOTES.md): per
// span, whether an item found its weights sound (the span's items for other rows then skip the
// check), and whether one found them corrupt (it skips the residue and the call fails).
struct ResidueChecks {
  std::unique_ptr<std::atomic<bool>[]> sound;  // [Spans(p)], all false at first (with a residue)
  std::atomic<bool> corrupt{false};
};

struct TileGemmArgs {
  const PackedTilesView* p;
  const void* x;               // [m, k], f32 or bf16 (raw bits)
  const void* values;          // [r, g], same dtype as x
  const void* residue_values;  // [e], same dtype as x
  bool bf16;                   // x's dtype
  int64_t m;
  const float* bias;           // [n], or nullptr for none
  void* y;                     // [m, n]
  bool y_bf16;                 // y's dtype: bf16 (x's), else f32
  Activation activation = Activation::kNone;
  // Write y's f32 rows with non-temporal stores (an output too large to stay in cache).
  bool stream = false;
  // The micro-kernel reads x's rows in place instead of packed panels (Rows; f32 x, few kept
  // tile weights per column of x: kDirectWeightsPerK).
  bool direct_x = false;
  // The tiles' weights as f32 micro-panels (step 1): tile t's at weights + weight_offsets[t].
  const float* weights = nullptr;
  const int64_t* weight_offsets = nullptr;
  // Few rows with a residue: x feature-major, xt[q * ldxt + i] = x[i][q] as f32, ldxt = m
  // (dense: at M = 1, x itself), with 16 floats of slack past the end (TransposeFew,
  // tw_cpu.cc).
  const float* xt = nullptr;
  int64_t ldxt = 0;
  // The residue's checks in this call (see ResidueChecks).
  ResidueChecks* residue_checks = nullptr;
};

// Element i of an f32 or bf16 (raw bits) array, as f32.
inline float LoadF32(const void* base, int64_t i, bool bf16) {
  if (!bf16) return static_cast<const float*>(base)[i];
  const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// f32 to bf16 bits, rounding to nearest even (as XLA's convert); NaN stays NaN.
inline uint16_t ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// With no tiles (an EW, VW or BW layer: all residue), spans of this many columns, so that the
// residue splits across threads even for one row (with one span [0, n), an EW layer at M = 1
// was one work item) and a span's buffer stays small. 64 rather than 256: N = 768 then makes 12
// work items, not 3 (EW 80%, M = 1-32: 1.22-1.36x; N = 3072 and M = 2048 unchanged; 32 was no
// better; BUILD_NOTES.md).
constexpr int64_t kBareSpan = 64;

// Span t of the output columns, [lo, hi) (see the top of this file). Spans() is how many there
// are.
inline int64_t Spans(const PackedTilesView& p) { return p.t > 0 ? p.t : (p.n + kBareSpan - 1) / kBareSpan; }
inline void Span(const PackedTilesView& p, int64_t t, int64_t* lo, int64_t* hi) {
  if (p.t == 0) {
    *lo = t * kBareSpan;
    *hi = *lo + kBareSpan < p.n ? *lo + kBareSpan : p.n;
    return;
  }
  *lo = t == 0 ? 0 : p.columns[t * p.g - 1] + 1;
  *hi = t + 1 >= Spans(p) ? p.n : p.columns[t * p.g + p.width(t) - 1] + 1;
}

// Most rows of x one work item covers: its panels should stay in L2.
constexpr int64_t kRowsPerItem = 192;
// The same in a layer with a residue, whose walk reads the item's rows of x feature-major at
// random K indices: 96 rows (8 f32 panels, 6 vectors; 3 bf16 panels) measured fastest of
// 48-512 at 75% TEW, M = 2048: against the 132-row items of kRowsPerItem's rule, f32 768 x 768
// 2.99 -> 2.80 ms, 3072 x 768 13.19 -> 11.67 ms (12.5% residue 19.33 -> 15.07), bf16
// 3072 x 768 7.92 -> 6.91 ms; at M = 4096 the BERT example's shapes from unchanged (384 x 384)
// to 4% faster (BUILD_NOTES.md).
constexpr int64_t kResidueRowsPerItem = 96;
// Deeper layers are worked through in K blocks of at most this many columns of x (Rows).
constexpr int64_t kKBlock = 768;
// Up to this many rows of x, packing x and copying the weights cost more than they save.
constexpr int64_t kSmallRows = 32;
// But bf16 layers with a residue take the blocked path from this many rows on where it runs on
// VDPBF16PS or AMX: the few-rows path's groups of rows are then at least a vector each, so its
// items copy their weights. Measured on AVX512-BF16 (BUILD_NOTES.md), the blocked path's speed
// over the few-rows path's, TEW 75% (and EW 90%): 1.14-1.39x at M = 16 but one case 0.93x,
// 1.34x at M = 20, 1.41-1.54x at M = 24, 2.2x at M = 32 with 12.5% residue; 0.63-0.97x at
// M = 4-12.
constexpr int64_t kPairResidueRows = 20;
// f32 layers with at most this many kept tile weights per column of x (row of W) read x in
// place, unpacked (TileGemmArgs::direct_x): packing costs K per row of x, the tiles' GEMMs about
// (kept weights) per row, and unpacked A costs the micro-kernel a little (the 12 values of a
// kept K index in 12 rows' lines, not one). Measured on AVX-512 at M = 2048 (BUILD_NOTES.md):
// 2-17% faster at 75-90% TW-2D (192 weights per column at 75% of 768 x 768 and 3072 x 768,
// 77-307 at 90%), 3-6% slower at 0% (768).
constexpr int64_t kDirectWeightsPerK = 320;
// f32 outputs of at least this many bytes are written with non-temporal stores
// (TileGemmArgs::stream): larger than a core's L2 here, they would not stay in cache anyway.
constexpr int64_t kStreamBytes = int64_t{4} << 20;

struct TileKernel {
  const char* isa;
  int64_t mr;            // panel height
  int64_t mr_bf16;       // rows of x per work item are a multiple of this for bf16 x
  int64_t vl;            // floats per vector
  // Floats of the per-call copy of a tile's weights in the layout its GEMM reads (f32
  // micro-panels; for bf16 on AMX, bf16 A tiles, counted in floats), and the copy itself
  // (64-byte aligned b). 0 and no copy where the GEMM reads the packed values in place (f32
  // with g a multiple of the micro-tile width).
  int64_t (*weight_size)(const TileGemmArgs&, int64_t tile);
  void (*pack_weights)(const TileGemmArgs&, int64_t tile, float* b);
  // Rows [m_begin, m_end) of y, spans [t_begin, t_end) (step 2); needs args.weights.
  void (*rows)(const TileGemmArgs&, int64_t m_begin, int64_t m_end, int64_t t_begin, int64_t t_end);
  // Span `tile` of rows [m_begin, m_end) when M <= kSmallRows: reads the packed values directly.
  void (*few)(const TileGemmArgs&, int64_t tile, int64_t m_begin, int64_t m_end);
};

// One definition per instruction set: tw_kernel_impl.cc is compiled once per ISA.
namespace avx512_amx { TileKernel Kernel(); }  // bf16 on AMX tiles, f32 as avx512
namespace avx512_bf16 { TileKernel Kernel(); }  // bf16 by VDPBF16PS, f32 as avx512
namespace avx512 { TileKernel Kernel(); }
namespace avx2 { TileKernel Kernel(); }
namespace generic { TileKernel Kernel(); }

}  // namespace jax_tw
