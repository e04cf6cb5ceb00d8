// The Hopper (sm_90a) tile GEMM for bf16: warpgroup MMA (wgmma) fed by cp.async gathers, built on
// CUTLASS's own sm90 mainloop, the cp.async + GMMA warp-specialized collective
// (MainloopSm90CpAsyncGmmaWarpSpecialized) that CUTLASS example 52_hopper_gather_scatter_fusion
// uses for its K-mode gather of a column-major A.
//
// Same contract, schedule and epilogue as the sm80 kernel (tw_cuda.cu): a CTA computes a
// 128 (M) x 128 (column chunk) block of one tile, units in the schedule's order (WorkOf), and
// writes its share of the tile's span of y (StoreSpan). Per CTA:
//   - two producer warpgroups (256 threads) copy 128 x 64 blocks of the gathered, feature-major
//     x (A, M-major: the K gather is the index functor of the layout's K stride, as in example
//     52) and of the tile's weights (B, N-major) into a 7-stage shared-memory pipeline with
//     16-byte cp.async, the first k-block partial (the collective zero-fills it below the
//     tile's depth);
//   - one consumer warpgroup (128 threads) runs wgmma m64n128k16 (bf16 in, f32 accumulators)
//     from the swizzled stages, then stages the accumulators in the same shared memory and
//     stores the span.
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
  extern __shared__ __align__(128) char smem_raw[];
  Sm90Smem<kBN>& smem = *reinterpret_cast<Sm90Smem<kBN>*>(smem_raw);
  constexpr int BM = size<0>(Tile{}), BK = size<2>(Tile{});

  const int64_t bid = blockIdx.x;
  const int64_t mb = bid % p.m_blocks, m0 = mb * BM;
  const CtaWork work = WorkOf(p, bid / p.m_blocks, p.n_chunks, kBN);
  const int64_t chunk = (bid / p.m_blocks) % p.n_chunks;
  const int64_t depth = work.end - work.begin;
  const int k_tiles = static_cast<int>((depth + BK - 1) / BK);

  const bool producer = threadIdx.x < kLoadThreads;
  typename Pipe::Params pipe_params;
  pipe_params.role = producer ? Pipe::ThreadCategory::Producer : Pipe::ThreadCategory::Consumer;
  pipe_params.producer_arv_count = kLoadThreads;
  pipe_params.consumer_arv_count = kMmaThreads;
  Pipe pipeline(smem.pipeline, pipe_params);
  __syncthreads();

  Mainloop collective;
  if (producer) {
    if (k_tiles == 0) return;  // a tile with no kept rows: nothing to load
    auto operands = Sm90Operands<kBN>(p, work, chunk, mb);
    Tensor gA = get<0>(operands);
    Tensor gB = get<1>(operands);
    auto state = cutlass::make_producer_start_state<Pipe>();
    collective.load(pipeline, state, gA, gB, make_coord_iterator(shape<2>(gA)), k_tiles, get<2>(operands),
                    static_cast<int>(threadIdx.x), smem.tensors.mainloop);
    state.advance(k_tiles);
    collective.load_tail(pipeline, state);
    return;
  }

  const int tid = static_cast<int>(threadIdx.x) - kLoadThreads;
  typename Mainloop::TiledMma mma;
  Tensor acc = partition_fragment_C(mma, take<0, 2>(Tile{}));
  if (k_tiles > 0) {
    typename Mainloop::PipelineState state;
    collective.mma(pipeline, state, acc, k_tiles, tid, smem.tensors.mainloop, typename Mainloop::Params{});
    collective.mma_tail(pipeline, state, k_tiles);
  } else {
    clear(acc);
  }
  // The consumers are the only threads left; once all of them are past their last MMA the
  // stages' bytes become the epilogue's.
  auto sync = [] {
    cutlass::arch::NamedBarrier::sync(kMmaThreads,
                                      static_cast<int>(cutlass::arch::ReservedNamedBarriers::FirstUserBarrier));
  };
  sync();
  using Epi = EpilogueStorage<Sm90Tile<kBN>>;
  Epi& epi = smem.tensors.epi;
  Tensor coord = mma.get_slice(tid).partition_C(make_identity_tensor(take<0, 2>(Tile{})));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) epi.c[get<0>(coord(i)) * Epi::kLdc + get<1>(coord(i))] = acc(i);
  StoreSpan<TOut>(p, work, m0, epi, tid, kMmaThreads, sync);
#endif
}

}  // namespace

template <int kBN, class TOut>
cudaError_t LaunchSm90With(cudaStream_t stream, Params p) {
  p.m_blocks = (p.m_rows + 127) / 128;
  p.n_chunks = (p.g + kBN - 1) / kBN;
  const int64_t blocks = p.m_blocks * p.n_chunks * p.t;
  if (blocks <= 0 || blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto kernel = TileGemmSm90Kernel<kBN, TOut>;
  const cudaError_t e = AllowSharedMemory<Sm90Tile<kBN>, TOut>(reinterpret_cast<const void*>(kernel),
                                                                 sizeof(Sm90Smem<kBN>));
  if (e != cudaSuccess) return e;
  kernel<<<static_cast<unsigned>(blocks), kSm90LoadThreads<kBN> + kSm90MmaThreads<kBN>,
           sizeof(Sm90Smem<kBN>), stream>>>(p);
  return cudaGetLastError();
}

template <class TOut>
cudaError_t LaunchSm90(cudaStream_t stream, Params p) {
  return Sm90ChunkFor(p.g) == 64 ? LaunchSm90With<64, TOut>(stream, p) : LaunchSm90With<128, TOut>(stream, p);
}

template cudaError_t LaunchSm90<float>(cudaStream_t, Params);
template cudaError_t LaunchSm90<cute::bfloat16_t>(cudaStream_t, Params);

}  // namespace cuda
}  // namespace jax_tw
