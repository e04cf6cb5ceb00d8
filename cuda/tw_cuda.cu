// The XLA FFI handler of tw_matmul on NVIDIA GPUs, and its kernels (CuTe, from CUTLASS).
//
//   y[M, N] = x[M, K] @ W + bias, W given as packed tiles (cpu/packed_tiles.h), f32 accumulation.
//
// x arrives feature-major: the custom call asks XLA for x in column-major layout, so the M values
// of one input feature are contiguous. A tile's kept K index then selects one contiguous run of
// x, and the K gather is fused into the kernel's global-to-shared copies (16-byte cp.async per
// thread; zeros past the tile's depth): there is no gather pass.
//
// One launch runs every tile of a layer, and nothing else runs: a CTA computes a BM x BN block
// of one tile's outputs (M block x column chunk; a tile of G <= BN columns is one chunk), CTAs
// of the deepest tiles first, in the order the packed format's schedule holds (computed once,
// by pack). The main loop is the multi-stage cp.async pipeline of CuTe's sm80 GEMM tutorial
// over the tile's own depth. The epilogue stages the accumulators in shared memory and writes
// the CTA's share of its tile's span of output columns: the chunk's kept columns (plus bias),
// and for chunk 0 the span's pruned columns (the bias, or zero), each warp storing consecutive
// columns of a row. Every output element is written once, by one CTA: no fill kernel, no
// scratch memory, no per-call sort.
//
// bf16: tensor cores (mma.sync m16n8k16, ldmatrix.trans from swizzled shared memory). f32: TF32
// tensor cores (mma.sync m16n8k8), as jnp.dot by default; exact f32 FMA on the CUDA cores when
// the call asks for Precision.HIGHEST. All run on sm_80 and later (A100, H100, H200).
//
// Corrupt tiles handed over under jit cannot be validated on the host (they live on the GPU):
// every index the kernels read is range-checked on the device, so they never touch memory out
// of bounds; jax_tw validates concrete tiles on the host before the call.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>

#include <cute/tensor.hpp>

#include "packed_tiles.h"
#include "tw_cuda_config.h"
#include "tw_cuda_sm90.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_tw {
namespace cuda {
namespace {

using namespace cute;

// 16 bytes from global to shared memory: cp.async where ok, else zeros stored directly (no
// address is formed from an invalid index, not even for a zero-byte copy).
template <class T>
__device__ __forceinline__ void CopyOrZero(bool ok, const T* src, T* dst) {
  if (ok) {
    SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                               *reinterpret_cast<uint128_t*>(dst));
  } else {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
}

template <class Cfg, class TOut>
__global__ void __launch_bounds__(decltype(size(typename Cfg::TiledMma{}))::value)
    TileGemmKernel(Params p) {
  using T = typename Cfg::T;
  using BM = typename Cfg::BM;
  using BN = typename Cfg::BN;
  using BK = typename Cfg::BK;
  using Storage = SharedStorage<Cfg>;
  constexpr int kVec = 16 / sizeof(T);  // values per 16-byte copy
  constexpr int kStages = Cfg::Stages::value;

  // Which (tile, column chunk, M block) this CTA computes: deepest tiles first.
  const int64_t bid = blockIdx.x;
  const int64_t mb = bid % p.m_blocks;
  const CtaWork work = WorkOf(p, bid / p.m_blocks, p.n_chunks, BN::value);
  const int64_t begin = work.begin, depth = work.end - work.begin;
  const int64_t chunk = (bid / p.m_blocks) % p.n_chunks;
  const int64_t m0 = mb * BM::value;

  extern __shared__ __align__(128) char smem_raw[];
  Storage& smem = *reinterpret_cast<Storage*>(smem_raw);
  typename Storage::SmemLayout smem_layout;
  Tensor sA = make_tensor(make_smem_ptr(smem.a.begin()), smem_layout);  // (BM, BK, stage)
  Tensor sB = make_tensor(make_smem_ptr(smem.b.begin()), smem_layout);  // (BN, BK, stage)

  // Global-to-shared: each thread copies 16-byte runs at fixed (m or n, k) coordinates of the
  // CTA tile; the source address of a run is computed here, which is where the gather happens.
  typename Cfg::GmemCopy gmem_copy;
  auto thr_copy = gmem_copy.get_slice(threadIdx.x);
  Tensor tAsA = thr_copy.partition_D(sA);  // (CPY, CPY_M, CPY_K, stage)
  Tensor tBsB = thr_copy.partition_D(sB);
  Tensor tCoord = thr_copy.partition_S(make_identity_tensor(make_shape(BM{}, BK{})));
  CUTE_STATIC_ASSERT_V(size<0>(tAsA) == Int<kVec>{});

  const T* xt = static_cast<const T*>(p.xt);
  const T* values = static_cast<const T*>(p.values);
  auto load_stage = [&](int64_t k_tile, int stage) {
    CUTE_UNROLL
    for (int j = 0; j < size<2>(tAsA); ++j) {
      const int64_t q = k_tile * BK::value + get<1>(tCoord(0, 0, j));  // position in the tile
      const bool in_tile = q < depth;
      const int64_t krow = in_tile ? p.rows[begin + q] : 0;
      const bool krow_ok = in_tile && krow >= 0 && krow < p.k;
      CUTE_UNROLL
      for (int i = 0; i < size<1>(tAsA); ++i) {
        const int64_t mn = get<0>(tCoord(0, i, j));
        const bool a_ok = krow_ok && m0 + mn < p.m_rows;
        CopyOrZero(a_ok, xt + krow * p.m_rows + m0 + mn, &tAsA(0, i, j, stage));
        const int64_t ncol = chunk * BN::value + mn;  // column within the tile's G
        const bool b_ok = in_tile && ncol < p.ldv;
        CopyOrZero(b_ok, values + (begin + q) * p.ldv + ncol, &tBsB(0, i, j, stage));
      }
    }
  };

  typename Cfg::TiledMma mma;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor cC = make_identity_tensor(make_shape(BM{}, BN{}));
  Tensor tCcC = thr_mma.partition_C(cC);                    // (MMA, MMA_M, MMA_N) coordinates
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA, MMA_N, MMA_K)
  Tensor acc = partition_fragment_C(mma, make_shape(BM{}, BN{}));
  clear(acc);

  auto s2r_copy_a = make_tiled_copy_A(typename Cfg::SmemCopyAtom{}, mma);
  auto s2r_thr_a = s2r_copy_a.get_slice(threadIdx.x);
  Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, stage)
  Tensor tXrA = s2r_thr_a.retile_D(tCrA);
  auto s2r_copy_b = make_tiled_copy_B(typename Cfg::SmemCopyAtom{}, mma);
  auto s2r_thr_b = s2r_copy_b.get_slice(threadIdx.x);
  Tensor tXsB = s2r_thr_b.partition_S(sB);
  Tensor tXrB = s2r_thr_b.retile_D(tCrB);

  // The pipeline of CuTe's sm80 tutorial: kStages - 1 k-tiles in flight while one is computed.
  int k_tile_count = static_cast<int>((depth + BK::value - 1) / BK::value);
  int64_t k_tile_next = 0;
  CUTE_UNROLL
  for (int stage = 0; stage < kStages - 1; ++stage) {
    load_stage(k_tile_next, stage);
    cp_async_fence();
    --k_tile_count;
    if (k_tile_count > 0) ++k_tile_next;
  }
  int read_stage = 0, write_stage = kStages - 1;
  Tensor tXsA_p = tXsA(_, _, _, read_stage);
  Tensor tXsB_p = tXsB(_, _, _, read_stage);
  constexpr int kBlocks = decltype(size<2>(tCrA))::value;
  if (kBlocks > 1) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    copy(s2r_copy_a, tXsA_p(_, _, Int<0>{}), tXrA(_, _, Int<0>{}));
    copy(s2r_copy_b, tXsB_p(_, _, Int<0>{}), tXrB(_, _, Int<0>{}));
  }
  CUTE_NO_UNROLL
  while (k_tile_count > -(kStages - 1)) {
    CUTE_UNROLL
    for (int kb = 0; kb < kBlocks; ++kb) {
      if (kb == kBlocks - 1) {
        tXsA_p = tXsA(_, _, _, read_stage);
        tXsB_p = tXsB(_, _, _, read_stage);
        cp_async_wait<kStages - 2>();
        __syncthreads();
      }
      const int kb_next = (kb + 1) % kBlocks;
      copy(s2r_copy_a, tXsA_p(_, _, kb_next), tXrA(_, _, kb_next));
      copy(s2r_copy_b, tXsB_p(_, _, kb_next), tXrB(_, _, kb_next));
      if (kb == 0) {
        load_stage(k_tile_next, write_stage);
        cp_async_fence();
        --k_tile_count;
        if (k_tile_count > 0) ++k_tile_next;
        write_stage = read_stage;
        read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
      }
      gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages' shared memory becomes the epilogue's

  // Epilogue: accumulators to shared memory, then the CTA's part of the tile's span to y.
  using Epi = EpilogueStorage<Cfg>;
  Epi& epi = *reinterpret_cast<Epi*>(smem_raw);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) epi.c[get<0>(tCcC(i)) * Epi::kLdc + get<1>(tCcC(i))] = acc(i);
  StoreSpan<TOut>(p, work, m0, epi, threadIdx.x, blockDim.x, [] { __syncthreads(); });
}

ffi::Error CudaError(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("tw_matmul (CUDA): ") + what + ": " +
                              cudaGetErrorString(e));
}

// Test hook: while set, y is filled with NaN first (all bits set is a NaN in f32 and bf16), so
// any entry the kernel fails to write shows up in the results. Set from JAX_TW_POISON_OUTPUT=1
// when the module loads, and by jax_tw._cuda.set_poison_output (no getenv per call).
std::atomic<bool> poison_output{[] {
  const char* v = std::getenv("JAX_TW_POISON_OUTPUT");
  return v != nullptr && v[0] == '1';
}()};

// Whether bf16 calls run the Hopper kernel: on devices of compute capability 9.0, unless
// JAX_TW_CUDA_KERNEL=sm80 was set when the module loaded (to compare the two).
bool UseSm90(const DeviceInfo& device) {
  static const bool allowed = [] {
    const char* v = std::getenv("JAX_TW_CUDA_KERNEL");
    return v == nullptr || std::string(v) != "sm80";
  }();
  return allowed && device.major == 9 && device.minor == 0;
}

template <class TOut>
ffi::Error LaunchSm90Kernel(cudaStream_t stream, Params p, int sms) {
  if (const cudaError_t e = LaunchSm90<TOut>(stream, p, sms); e != cudaSuccess)
    return ffi::Error::Internal(std::string("tw_matmul (CUDA): sm90 tile GEMM: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

template <class Cfg, class TOut>
ffi::Error Launch(cudaStream_t stream, Params p);

// bf16: the Hopper kernel on compute capability 9.0, else the sm80 one.
template <class TOut>
ffi::Error LaunchBf16(cudaStream_t stream, Params p) {
  const DeviceInfo device = CurrentDeviceInfo();
  if (device.error != cudaSuccess)
    return ffi::Error::Internal(std::string("tw_matmul (CUDA): reading the device's attributes: ") +
                                cudaGetErrorString(device.error));
  return UseSm90(device) ? LaunchSm90Kernel<TOut>(stream, p, device.sms) : Launch<Bf16Config, TOut>(stream, p);
}

template <class Cfg, class TOut>
ffi::Error Launch(cudaStream_t stream, Params p) {
  p.m_blocks = (p.m_rows + Cfg::BM::value - 1) / Cfg::BM::value;
  p.n_chunks = (p.g + Cfg::BN::value - 1) / Cfg::BN::value;
  const int64_t blocks = p.m_blocks * p.n_chunks * p.t;
  if (blocks > 0x7fffffff)
    return ffi::Error::InvalidArgument("tw_matmul (CUDA): too many CTAs (" +
                                       std::to_string(blocks) + ") for one launch");
  constexpr int smem = SmemBytes<Cfg>();
  auto kernel = TileGemmKernel<Cfg, TOut>;
  if (AllowSharedMemory<Cfg, TOut>(reinterpret_cast<const void*>(kernel), smem) != cudaSuccess)
    return CudaError("cudaFuncSetAttribute");
  const int threads = decltype(size(typename Cfg::TiledMma{}))::value;
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return CudaError("tile GEMM kernel");
}

ffi::Error TwMatmulCudaImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> columns,
                            ffi::Buffer<ffi::S32> row_offsets, ffi::Buffer<ffi::S32> rows,
                            ffi::AnyBuffer values, ffi::Buffer<ffi::S32> tile_order,
                            ffi::Buffer<ffi::S32> pruned, ffi::Buffer<ffi::S32> pruned_offsets,
                            ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y, int64_t n,
                            int64_t tile_size, int64_t exact_f32) {
  try {
    const auto xd = x.dimensions();
    if (xd.size() != 2) return ffi::Error::InvalidArgument("tw_matmul (CUDA): x must be 2-D (M, K)");
    const ffi::DataType xt = x.element_type(), yt = y->element_type();
    const bool bf16 = xt == ffi::DataType::BF16;
    if (!bf16 && xt != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): x must be float32 or bfloat16");
    if (values.element_type() != xt)
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): values and x must share a dtype");
    if (yt != xt && yt != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): the output must be x's dtype or float32");
    const int64_t vec = bf16 ? 8 : 4;  // values per 16-byte copy
    if (xd[1] < 2)
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): x must hold K + 1 columns, the last zeros");
    Params p{};
    static_cast<PackedTilesView&>(p) =
        PackedTilesView::Of(xd[1] - 1, n, tile_size, columns, row_offsets, rows);
    p.m_rows = xd[0];
    if (std::string bad = p.ValidateSizes(); !bad.empty())
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): corrupt packed tiles: " + bad);
    if (p.t == 0)  // jax_tw writes the bias itself then, without a call
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): no tiles (the output is the bias)");
    p.np = pruned.element_count();
    if (tile_order.element_count() != p.t || pruned_offsets.element_count() != p.t + 1 || p.np > n)
      return ffi::Error::InvalidArgument(
          "tw_matmul (CUDA): the schedule must hold t tile_order, at most n pruned and t + 1 "
          "pruned_offsets entries (t = " + std::to_string(p.t) + ")");
    p.tile_order = tile_order.typed_data();
    p.pruned = pruned.typed_data();
    p.pruned_offsets = pruned_offsets.typed_data();
    const auto vd = values.dimensions();
    if (vd.size() != 2 || vd[0] != p.r || vd[1] < p.g || vd[1] % vec)
      return ffi::Error::InvalidArgument(
          "tw_matmul (CUDA): values must be (len(rows), L) with L >= tile_size and a multiple of " +
          std::to_string(vec));
    p.ldv = vd[1];
    if (p.m_rows % vec)
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): M must be a multiple of " +
                                         std::to_string(vec) + ", got " + std::to_string(p.m_rows));
    if (bias.element_count() != n)
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): bias must have n entries");
    const auto yd = y->dimensions();
    if (yd.size() != 2 || yd[0] != p.m_rows || yd[1] != n)
      return ffi::Error::InvalidArgument("tw_matmul (CUDA): output must be (M, n)");
    if (p.m_rows == 0) return ffi::Error::Success();
    p.xt = x.untyped_data();
    p.values = values.untyped_data();
    p.bias = bias.typed_data();
    p.y = y->untyped_data();
    if (poison_output.load(std::memory_order_relaxed) &&
        cudaMemsetAsync(p.y, 0xff, y->size_bytes(), stream) != cudaSuccess)
      return CudaError("cudaMemsetAsync (poison)");
    if (!bf16) return exact_f32 ? Launch<F32Config, float>(stream, p) : Launch<Tf32Config, float>(stream, p);
    if (yt == ffi::DataType::F32) return LaunchBf16<float>(stream, p);
    return LaunchBf16<cute::bfloat16_t>(stream, p);
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("tw_matmul (CUDA): ") + e.what());
  }
}

}  // namespace
}  // namespace cuda
}  // namespace jax_tw

// Target jax_tw_tw_matmul_cuda_v2: x (column-major), columns, row_offsets, rows, values,
// tile_order, pruned, pruned_offsets, bias -> y (x's dtype, or f32); attributes n, tile_size,
// exact_f32 (int64; f32 x: 0 runs TF32 tensor cores, 1 exact f32 on the CUDA cores).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxTwTwMatmulCuda, jax_tw::cuda::TwMatmulCudaImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>()         // x (M, K), column-major
        .Arg<ffi::Buffer<ffi::S32>>()  // columns (C,)
        .Arg<ffi::Buffer<ffi::S32>>()  // row_offsets (T + 1,)
        .Arg<ffi::Buffer<ffi::S32>>()  // rows (R,)
        .Arg<ffi::AnyBuffer>()         // values (R, L)
        .Arg<ffi::Buffer<ffi::S32>>()  // tile_order (T,)
        .Arg<ffi::Buffer<ffi::S32>>()  // pruned (P,), P >= 1 (a dummy when no column is pruned)
        .Arg<ffi::Buffer<ffi::S32>>()  // pruned_offsets (T + 1,)
        .Arg<ffi::Buffer<ffi::F32>>()  // bias (N,)
        .Ret<ffi::AnyBuffer>()         // y (M, N)
        .Attr<int64_t>("n")
        .Attr<int64_t>("tile_size")
        .Attr<int64_t>("exact_f32"));

// Number of CUDA devices the runtime sees, or minus the CUDA error code (a check that the
// statically linked runtime loads without a GPU).
extern "C" int JaxTwCudaDeviceCount() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  return e == cudaSuccess ? count : -static_cast<int>(e);
}

extern "C" void JaxTwCudaSetPoisonOutput(int on) { jax_tw::cuda::poison_output.store(on != 0); }
