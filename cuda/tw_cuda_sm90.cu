// The Hopper (sm_90a) tile GEMM for bf16: warpgroup MMA (wgmma) fed by cp.async gathers, built on
// CUTLASS's own sm90 mainloop, the cp.async + GMMA warp-specialized collective
// (MainloopSm90CpAsyncGmmaWarpSpecialized) that CUTLASS example 52_hopper_gather_scatter_fusion
// uses for its K-mode gather of a column-major A.
//
// Same contract, schedule and epilogue as the sm80 kernel (tw_cuda.cu): a unit is a 128 (M) x
// 128 (column chunk) block of one tile, units in the schedule's order (WorkOf), and a unit
// writes its share of the tile's span of y (StoreSpan). The grid is persistent: one CTA per SM
// walks units cta, cta + #CTAs, ... (ForEachSm90Unit). Per CTA:
//   - two producer warpgroups (256 threads) copy 128 x 64 blocks of the gathered, feature-major
//     x (A, M-major: the K gather is the index functor of the layout's K stride, as in example
//     52) and of the tile's weights (B, N-major) into a shared-memory pipeline (6 stages at BN 128, 8 at 64) with
//     16-byte cp.async, the first k-block partial (the collective zero-fills it below the
//     tile's depth);
//   - one consumer warpgroup (128 threads) runs wgmma m64n128k16 (bf16 in, f32 accumulators)
//     from the swizzled stages, then stages the accumulators (64 rows at a time) in shared
//     memory of their own and stores the span, while the producers already load the next
//     unit's stages.
// A kept K index outside [0, k) is read as row k of x, which the caller makes zeros: corrupt
// tiles read no memory out of bounds and add nothing, as on the sm80 path.
//
// Compiled for sm_90a only (CMakeLists.txt): the wgmma instructions exist only there, and a
// kernel body built for another target would be an empty stub (the body is guarded by
// __CUDA_ARCH_FEAT_SM90_ALL). The handler picks this kernel for bf16 on devices of compute
// capability 9.0.
#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/arch/barrier.h"
#include "tw_cuda_sm90_config.h"

namespace jax_tw {
namespace cuda {

namespace {

template <int kBN, class TOut>
__global__ void __launch_bounds__(kSm90LoadThreads<kBN> + kSm90MmaThreads<kBN>, 1)
    TileGemmSm90Kernel(Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Mainloop = Sm90Mainloop<kBN>;
  using Tile = Sm90TileShape<kBN>;
  using Pipe = typename Mainloop::MainloopPipeline;
  constexpr int kLoadThreads = kSm90LoadThreads<kBN>, kMmaThreads = kSm90MmaThreads<kBN>;
  static_assert(kMmaThreads == 128, "one consumer warpgroup");
  extern __shared__ __align__(1024) char smem_raw[];  // the 128-byte swizzle's atom
  Sm90Smem<kBN>& smem = *reinterpret_cast<Sm90Smem<kBN>*>(smem_raw);
  constexpr int BM = size<0>(Tile{});

  const bool producer = threadIdx.x < kLoadThreads;
  typename Pipe::Params pipe_params;
  pipe_params.role = producer ? Pipe::ThreadCategory::Producer : Pipe::ThreadCategory::Consumer;
  pipe_params.producer_arv_count = kLoadThreads;
  pipe_params.consumer_arv_count = kMmaThreads;
  Pipe pipeline(smem.pipeline, pipe_params);
  __syncthreads();

  // Both roles walk the same units (ForEachSm90Unit) and skip the same ones (no kept rows: the
  // collective needs at least one k-block), so each side's pipeline state carries over from
  // one unit to the next as in CUTLASS's persistent kernels.
  Mainloop collective;
  if (producer) {
    auto state = cutlass::make_producer_start_state<Pipe>();
    ForEachSm90Unit<kBN>(p, blockIdx.x, gridDim.x, [&](const Sm90Unit& u) {
      if (u.k_tiles == 0) return;
      auto operands = Sm90Operands<kBN>(p, u.work, u.chunk, u.mb);
      Tensor gA = get<0>(operands);
      Tensor gB = get<1>(operands);
      collective.load(pipeline, state, gA, gB, make_coord_iterator(shape<2>(gA)), u.k_tiles, get<2>(operands),
                      static_cast<int>(threadIdx.x), smem.mainloop);
      state.advance(u.k_tiles);
    });
    collective.load_tail(pipeline, state);
    return;
  }

  const int tid = static_cast<int>(threadIdx.x) - kLoadThreads;
  typename Mainloop::TiledMma mma;
  using Epi = EpilogueStorage<Sm90Staged<kBN>>;
  Epi& epi = smem.epi;
  // The consumers' barrier (the producers never wait on it): user barrier 0, which CUTLASS
  // places after its reserved ones (hardware barrier 8 of 16; the ID passed is user-relative).
  auto sync = [] { cutlass::arch::NamedBarrier::sync(kMmaThreads, kSm90EpilogueBarrier); };
  typename Mainloop::PipelineState state;
  ForEachSm90Unit<kBN>(p, blockIdx.x, gridDim.x, [&](const Sm90Unit& u) {
    Tensor acc = partition_fragment_C(mma, take<0, 2>(Tile{}));
    if (u.k_tiles > 0) {
      collective.mma(pipeline, state, acc, u.k_tiles, tid, smem.mainloop, typename Mainloop::Params{});
      collective.mma_tail(pipeline, state, u.k_tiles);  // waits for its MMAs, frees the stages
      state.advance(u.k_tiles);
    } else {
      clear(acc);
    }
    // The staging holds half the rows: the accumulators of the m64 MMA atom `half` (acc's mode
    // 1), rows [64 half, 64 half + 64) of the unit.
    Tensor coord = mma.get_slice(tid).partition_C(make_identity_tensor(take<0, 2>(Tile{})));
    static_assert(size<1>(decltype(acc){}) * Epi::kRows == BM, "one m64 atom per staged half");
    CUTE_UNROLL
    for (int half = 0; half < size<1>(acc); ++half) {
      sync();  // every consumer is done reading the staging's previous contents
      Tensor acc_h = acc(_, half, _);
      Tensor coord_h = coord(_, half, _);
      CUTE_UNROLL
      for (int i = 0; i < size(acc_h); ++i)
        epi.c[(get<0>(coord_h(i)) - half * Epi::kRows) * Epi::kLdc + get<1>(coord_h(i))] = acc_h(i);
      StoreSpan<TOut>(p, u.work, u.mb * BM + half * Epi::kRows, epi, tid, kMmaThreads, sync);
    }
  });
#endif
}

}  // namespace

template <int kBN, class TOut>
cudaError_t LaunchSm90With(cudaStream_t stream, Params p, int sms) {
  constexpr int64_t BM = size<0>(Sm90TileShape<kBN>{});
  p.m_blocks = (p.m_rows + BM - 1) / BM;
  p.n_chunks = (p.g + kBN - 1) / kBN;
  const int64_t units = p.m_blocks * p.n_chunks * p.t;
  if (units <= 0 || sms <= 0) return cudaErrorInvalidConfiguration;
  auto kernel = TileGemmSm90Kernel<kBN, TOut>;
  const cudaError_t e = AllowSharedMemory<Sm90Staged<kBN>, TOut>(reinterpret_cast<const void*>(kernel),
                                                                 sizeof(Sm90Smem<kBN>));
  if (e != cudaSuccess) return e;
  const int64_t ctas = units < sms ? units : sms;  // one per SM: the shared memory allows no more
  kernel<<<static_cast<unsigned>(ctas), kSm90LoadThreads<kBN> + kSm90MmaThreads<kBN>, sizeof(Sm90Smem<kBN>),
           stream>>>(p);
  return cudaGetLastError();
}

template <class TOut>
cudaError_t LaunchSm90(cudaStream_t stream, Params p, int sms) {
  return Sm90ChunkFor(p.g) == 64 ? LaunchSm90With<64, TOut>(stream, p, sms)
                                 : LaunchSm90With<128, TOut>(stream, p, sms);
}

template cudaError_t LaunchSm90<float>(cudaStream_t, Params, int);
template cudaError_t LaunchSm90<cute::bfloat16_t>(cudaStream_t, Params, int);

}  // namespace cuda
}  // namespace jax_tw
