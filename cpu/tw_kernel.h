// Host kernel for tile-wise matmul over packed tiles: y[M, N] (f32) = x[M, K] @ W_packed.
//
// Calls with M <= kSmallRows read the packed values directly (SmallTile). Otherwise, per call:
//  1. Pack x once into row panels: panels[p][k][i] = x[p * MR + i][k] (f32, zero past M). A
//     panel holds MR rows of x feature-major, so the MR values a micro-kernel needs at depth k
//     are contiguous whatever k is: the K gather of every tile then costs one index load per k,
//     fused into the micro-kernel's loads (no per-tile gather pass).
//  2. Each tile's weights are copied once into f32 micro-panels (contiguous KC x NR blocks).
//  3. Work items (tile, block of kRowsPerItem rows) run a register-blocked GEMM of the block's
//     panels against the tile's weights and scatter the result to the tile's output columns.
#pragma once

#include <cstdint>
#include <cstring>

#include "packed_tiles.h"

namespace jax_tw {

struct TileGemmArgs {
  const PackedTilesView* p;
  const void* x;       // [m, k], f32 or bf16 (raw bits)
  const void* values;  // [r, g], same dtype as x
  bool bf16;
  int64_t m;
  float* y;            // [m, n]
  // Pruned output columns, split among the tiles (tile t zeroes
  // zero_cols[zero_offsets[t], zero_offsets[t+1]) in its epilogue, while those rows are hot).
  const int32_t* zero_cols;
  const int64_t* zero_offsets;
};

// Element i of an f32 or bf16 (raw bits) array, as f32.
inline float LoadF32(const void* base, int64_t i, bool bf16) {
  if (!bf16) return static_cast<const float*>(base)[i];
  const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Rows of M that one work item covers (a multiple of every ISA's panel height MR).
constexpr int64_t kRowsPerItem = 192;

struct TileKernel {
  const char* isa;
  int64_t mr;  // panel height
  // Packs panels [p_begin, p_end) of x into `panels` (layout above).
  void (*pack)(const TileGemmArgs&, float* panels, int64_t p_begin, int64_t p_end);
  // Floats of the micro-panel copy of a tile's weights, and the copy itself (64-byte aligned b).
  int64_t (*weight_size)(const PackedTilesView&, int64_t tile);
  void (*pack_weights)(const TileGemmArgs&, int64_t tile, float* b);
  // Rows [m_begin, m_end) (m_begin a multiple of MR) of tile `tile`, weights from pack_weights.
  void (*tile)(const TileGemmArgs&, const float* panels, const float* weights, int64_t tile,
               int64_t m_begin, int64_t m_end);
  // All rows of tile `tile` when M <= kSmallRows: reads the packed values directly, no copies.
  void (*small_tile)(const TileGemmArgs&, int64_t tile);
};

// Up to this many rows of x, packing x and copying the weights cost more than they save.
constexpr int64_t kSmallRows = 32;

// One definition per instruction set: tw_kernel_impl.cc is compiled once per ISA.
namespace avx512 { TileKernel Kernel(); }
namespace avx2 { TileKernel Kernel(); }
namespace generic { TileKernel Kernel(); }

}  // namespace jax_tw
