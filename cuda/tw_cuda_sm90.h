// The Hopper (sm_90a) tile GEMM (tw_cuda_sm90.cu), as the handler (tw_cuda.cu) calls it.
#pragma once

#include <cuda_runtime.h>

#include "tw_cuda_config.h"

namespace jax_tw {
namespace cuda {

// CTA tile M x N x K: 128 rows of x, a kBN-column chunk of a tile (64 for tiles of G <= 64, else
// 128), 64 kept K rows per stage.
template <int kBN>
using Sm90TileShape = cute::Shape<cute::_128, cute::Int<kBN>, cute::_64>;
// The epilogue's staging (EpilogueStorage): half a unit's rows, 64 x kBN accumulators, at a
// time, so that the stages keep most of the shared memory.
template <int kBN>
struct Sm90Staged {
  using BM = cute::_64;
  using BN = cute::Int<kBN>;
};

// The column chunk the Hopper kernel uses for tiles of tile_size g.
inline int Sm90ChunkFor(int64_t g) { return g <= 64 ? 64 : 128; }

// Launches the kernel for bf16 x and values and y in TOut (float or cute::bfloat16_t) on a
// device of `sms` multiprocessors (the persistent grid's size, at most); x holds k + 1 feature
// rows, the last zeros. Returns the launch's error.
template <class TOut>
cudaError_t LaunchSm90(cudaStream_t stream, Params p, int sms);


}  // namespace cuda
}  // namespace jax_tw
