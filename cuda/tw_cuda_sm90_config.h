// The Hopper kernel's CUTLASS configuration (tw_cuda_sm90.cu): the mainloop collective, the
// shared memory of a CTA and the K-gather functor. A header of its own so that
// tests/cuda_sm90_check.cu can check on the host the index assumptions the kernel makes.
#pragma once

#include <cstdint>

#include "cutlass/arch/barrier.h"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/pipeline/pipeline.hpp"
#include "gather_tensor.hpp"  // CUTLASS's examples/common (the nvidia-cutlass wheel)
#include "tw_cuda_config.h"
#include "tw_cuda_sm90.h"

namespace jax_tw {
namespace cuda {

using namespace cute;

// x's kept K index q of a tile: rows[q] where it lies in [0, k), else k (the zero row).
struct ClampedGather {
  const int32_t* rows;
  int32_t k;
  template <class I>
  CUTE_HOST_DEVICE constexpr int32_t operator()(I i) const {
    const int32_t r = rows[i];
    return r >= 0 && r < k ? r : k;
  }
  CUTE_HOST_DEVICE friend void print(ClampedGather const&) { cute::print("ClampedGather"); }
};

// The mainloop: CUTLASS's builder for a bf16 column-major A (M-major, gathered) and row-major
// B (N-major), 128 x kBN x 64 CTA tiles, no cluster, as many stages as fit beside the
// epilogue's staging (its own bytes: the producers load the next unit's stages while the
// consumers store this one's).
template <int kBN>
using Sm90Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::bfloat16_t,
    cutlass::layout::ColumnMajor, 8, cutlass::bfloat16_t, cutlass::layout::RowMajor, 8, float,
    Sm90TileShape<kBN>, Shape<_1, _1, _1>,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(EpilogueStorage<Sm90Staged<kBN>>))>,
    cutlass::gemm::KernelCpAsyncWarpSpecialized>::CollectiveOp;

template <int kBN>
struct Sm90Smem {
  typename Sm90Mainloop<kBN>::TensorStorage mainloop;
  EpilogueStorage<Sm90Staged<kBN>> epi;
  alignas(16) typename Sm90Mainloop<kBN>::PipelineStorage pipeline;
};

// The epilogue's named barrier among the consumers, as a CUTLASS user barrier ID: NamedBarrier
// adds its reserved count (8), and the hardware has 16.
constexpr uint32_t kSm90EpilogueBarrier = 0;
static_assert(kSm90EpilogueBarrier + cutlass::arch::NamedBarrier::ReservedNamedBarrierCount <
                  cutlass::arch::NamedBarrier::HardwareMaxNumNamedBarriers,
              "no such hardware barrier");

template <int kBN>
constexpr int kSm90LoadThreads = size(typename Sm90Mainloop<kBN>::GmemTiledCopyA{});
template <int kBN>
constexpr int kSm90MmaThreads = size(typename Sm90Mainloop<kBN>::TiledMma{});

// What the mainloop reads for one CTA (tile work.tile, column chunk, M block mb): A, x gathered
// at the tile's kept K indices, (M, depth) M-major; B, the chunk's weights, (chunk columns,
// depth) N-major; both cut into the CTA's 128 x 64 and kBN x 64 blocks along K (k-block index
// last); and the residue (M, N, K) the collective predicates its copies with (K: zero or
// negative, the first k-block being the partial one).
template <int kBN>
CUTE_HOST_DEVICE auto Sm90Operands(const Params& p, const CtaWork& work, int64_t chunk, int64_t mb) {
  using T = cutlass::bfloat16_t;
  using Tile = Sm90TileShape<kBN>;
  constexpr int64_t BM = size<0>(Tile{}), BK = size<2>(Tile{});
  const int64_t depth = work.end - work.begin;
  const int64_t chunk_cols = Clamp(p.ldv - chunk * kBN, 0, kBN);
  typename Sm90Mainloop<kBN>::StrideA stride_a = make_stride(_1{}, p.m_rows, int64_t(0));
  typename Sm90Mainloop<kBN>::StrideB stride_b = make_stride(_1{}, p.ldv, int64_t(0));
  Tensor mA = example::make_gather_tensor(make_gmem_ptr(static_cast<const T*>(p.xt)),
                                          make_shape(p.m_rows, depth, int64_t(1)), stride_a,
                                          ClampedGather{p.rows + work.begin, static_cast<int32_t>(p.k)});
  Tensor mB = make_tensor(make_gmem_ptr(static_cast<const T*>(p.values) + work.begin * p.ldv + chunk * kBN),
                          make_shape(chunk_cols, depth, int64_t(1)), stride_b);
  Tensor gA = local_tile(mA, Tile{}, make_coord(_, _, _), Step<_1, X, _1>{})(_, _, mb, _, 0);
  Tensor gB = local_tile(mB, Tile{}, make_coord(_, _, _), Step<X, _1, _1>{})(_, _, 0, _, 0);
  const int64_t k_tiles = (depth + BK - 1) / BK;
  return make_tuple(gA, gB, make_tuple(p.m_rows - mb * BM, chunk_cols, depth - BK * k_tiles));
}

// One unit of the kernel's work: M block mb of column chunk `chunk` of a tile (unit u is M
// block u % m_blocks of (tile, chunk) unit u / m_blocks of the schedule: M blocks vary fastest,
// so the CTAs in flight share a tile's weights), and the 64-row k-blocks its mainloop runs.
struct Sm90Unit {
  CtaWork work;
  int64_t chunk, mb;
  int k_tiles;
};

template <int kBN>
CUTE_HOST_DEVICE Sm90Unit Sm90UnitOf(const Params& p, int64_t unit) {
  constexpr int64_t BK = size<2>(Sm90TileShape<kBN>{});
  Sm90Unit u;
  u.mb = unit % p.m_blocks;
  const int64_t tile_unit = unit / p.m_blocks;
  u.work = WorkOf(p, tile_unit, p.n_chunks, kBN);
  u.chunk = tile_unit % p.n_chunks;
  u.k_tiles = static_cast<int>((u.work.end - u.work.begin + BK - 1) / BK);
  return u;
}

// The persistent grid's walk: CTA `cta` of `ctas` takes units cta, cta + ctas, ... of the
// m_blocks x n_chunks x t (the schedule's order, deepest tiles first, dealt round-robin).
// Producers and consumers walk the same units, so they agree on every unit's k-blocks and
// their pipeline states stay in step across units.
template <int kBN, class F>
CUTE_HOST_DEVICE void ForEachSm90Unit(const Params& p, int64_t cta, int64_t ctas, F&& f) {
  const int64_t units = p.m_blocks * p.n_chunks * p.t;
  for (int64_t u = cta; u < units; u += ctas) f(Sm90UnitOf<kBN>(p, u));
}

}  // namespace cuda
}  // namespace jax_tw
