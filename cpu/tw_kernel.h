// Host kernel for tile-wise matmul over packed tiles: y[M, N] (f32) = x[M, K] @ W_packed.
//
// Calls with M <= kSmallRows read the packed values directly (SmallTile). Otherwise:
//  1. Each tile's weights are copied once per call into f32 micro-panels (contiguous KC x NR
//     blocks), in parallel over tiles.
//  2. Work items are blocks of rows of x; each computes every tile for its rows, so that its
//     part of x and of y stays in the core's L2 cache from start to finish:
//     a. pack its rows of x into panels: panel[q][i] = x[m0 + i][q] (f32, zero past M). A panel
//        holds MR rows of x feature-major, so the MR values a micro-kernel needs at depth q are
//        contiguous whatever q is: the K gather of every tile costs one index load per q, fused
//        into the micro-kernel's loads (no per-tile gather pass);
//     b. zero its rows of y where columns are pruned;
//     c. per tile, a register-blocked GEMM of the panels against the tile's weights, scattered
//        to the tile's output columns.
//  Writing whole rows of y from one core matters: when work items were (tile, rows), every tile
//  rewrote scattered columns of the same rows of y from whichever core ran it, and the zeroing
//  of pruned columns alone cost as much as the tiles' arithmetic at N = 768.
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
  // The tiles' weights as f32 micro-panels (step 1): tile t's at weights + weight_offsets[t].
  const float* weights = nullptr;
  const int64_t* weight_offsets = nullptr;
};

// Element i of an f32 or bf16 (raw bits) array, as f32.
inline float LoadF32(const void* base, int64_t i, bool bf16) {
  if (!bf16) return static_cast<const float*>(base)[i];
  const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Most rows of x one work item covers: its panels and rows of y must fit in L2 together.
constexpr int64_t kRowsPerItem = 192;

struct TileKernel {
  const char* isa;
  int64_t mr;  // panel height
  // Floats of the micro-panel copy of a tile's weights, and the copy itself (64-byte aligned b).
  int64_t (*weight_size)(const PackedTilesView&, int64_t tile);
  void (*pack_weights)(const TileGemmArgs&, int64_t tile, float* b);
  // Rows [m_begin, m_end) of y, every tile (step 2); needs args.weights.
  void (*rows)(const TileGemmArgs&, int64_t m_begin, int64_t m_end);
  // All rows of tile `tile` when M <= kSmallRows: reads the packed values directly, no copies;
  // pruned columns are left alone (the caller zeroes y first).
  void (*small_tile)(const TileGemmArgs&, int64_t tile);
};

// Up to this many rows of x, packing x and copying the weights cost more than they save.
constexpr int64_t kSmallRows = 32;

// One definition per instruction set: tw_kernel_impl.cc is compiled once per ISA.
namespace avx512 { TileKernel Kernel(); }
namespace avx2 { TileKernel Kernel(); }
namespace generic { TileKernel Kernel(); }

}  // namespace jax_tw
