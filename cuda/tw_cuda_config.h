// The CTA configurations of the CUDA tile GEMM (tw_cuda.cu): tile shapes, MMA atoms, shared-
// memory layouts and copy patterns. A header of its own so that tests/cuda_layout_check.cu can
// check on the host the index assumptions the kernel makes about them.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <tuple>

#include <cute/tensor.hpp>

#include "packed_tiles.h"

namespace jax_tw {
namespace cuda {

using namespace cute;

// The layer's packed tiles (the format's one C++ definition, schedule included; index arrays
// on the GPU) and the rest of a call.
struct Params : PackedTilesView {
  const void* xt;            // x, element (m, k) at xt[k * m_rows + m]; row k of xt is zeros
  const void* values;        // [r, ldv]: row q holds the G weights of kept row q (zero past G)
  const float* bias;         // [n]
  void* y;                   // [m_rows, n], row-major
  int64_t m_rows, ldv;
  int64_t m_blocks, n_chunks;
};

__host__ __device__ __forceinline__ int64_t Clamp(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// What one CTA of the tile GEMM computes and writes. Units are (tile, column chunk) pairs in
// the schedule's order (deepest tiles first): unit u is chunk u % n_chunks of tile
// tile_order[u / n_chunks]. Every index read from the packed tiles is clamped, so corrupt tiles
// (which cannot be validated on the host under jit) never lead outside their arrays.
struct CtaWork {
  int64_t tile;
  int64_t begin, end;                // the tile's kept rows: rows[begin, end)
  int64_t col0, width;               // the chunk's kept columns: columns[col0, col0 + width)
  int64_t pruned_begin, pruned_end;  // the span's pruned columns, pruned[begin, end): chunk 0's
};

__host__ __device__ inline CtaWork WorkOf(const PackedTilesView& p, int64_t unit, int64_t n_chunks,
                                          int64_t bn) {
  CtaWork w;
  const int64_t chunk = unit % n_chunks;
  w.tile = Clamp(p.tile_order[unit / n_chunks], 0, p.t - 1);
  w.begin = Clamp(p.row_offsets[w.tile], 0, p.r);
  w.end = Clamp(p.row_offsets[w.tile + 1], w.begin, p.r);
  w.col0 = w.tile * p.g + chunk * bn;
  w.width = Clamp(p.c - w.col0, 0, Clamp(p.g - chunk * bn, 0, bn));
  w.pruned_begin = Clamp(p.pruned_offsets[w.tile], 0, p.np);
  w.pruned_end = chunk == 0 ? Clamp(p.pruned_offsets[w.tile + 1], w.pruned_begin, p.np) : w.pruned_begin;
  return w;
}

// The epilogue's thread loops over a rows x cols block: warps take rows, a warp's lanes take
// consecutive columns (so a warp's stores are one run of a row of y: coalesced). Thread tid of
// threads (a multiple of 32) calls f(row, col) for its share; together the threads visit every
// (row, col) once.
template <class F>
__host__ __device__ __forceinline__ void ForRowsCols(int tid, int threads, int64_t rows, int64_t cols, F&& f) {
  const int warps = threads / 32;
  for (int64_t i = tid / 32; i < rows; i += warps)
    for (int64_t j = tid % 32; j < cols; j += 32) f(i, j);
}

// bf16 on tensor cores: CTA tile 128 x 128 x 32, 4 warps (2 x 2) of 32 x 32 MMA tiles, 3 stages.
// x (M-major) and the tile's weights (N-major) share one shared-memory layout and copy pattern.
struct Bf16Config {
  using T = cute::bfloat16_t;
  using BM = _128;
  using BN = _128;
  using BK = _32;
  using Stages = _3;
  using TiledMma = TiledMMA<MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>, Layout<Shape<_2, _2, _1>>,
                            Tile<_32, _32, _16>>;
  using SmemLayoutAtom =
      decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{}));
  using SmemCopyAtom = Copy_Atom<SM75_U16x8_LDSM_T, T>;
  // Thread layout of the 16-byte global-to-shared copies (8 values along M or N each).
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, T>{},
                                            Layout<Shape<_16, _8>, Stride<_1, _16>>{},
                                            Layout<Shape<_8, _1>>{}));
};

// f32 on tensor cores as TF32 (what jnp.dot does with f32 on a GPU unless asked for
// Precision.HIGHEST): CUTLASS's own sm80 choices for an M-major A and N-major B TF32 GEMM
// (DefaultGemm_TensorOpSm80_OperandA<tfloat32_t, ColumnMajor> of its unit tests). CTA tile
// 128 x 128 x 32, 4 warps (2 x 2) of 32 x 32 MMA tiles, 3 stages; Swizzle<3,2,3> shared memory;
// plain 32-bit copies to registers (ldmatrix cannot transpose 32-bit values). x and the weights
// stay f32 in memory; the MMA takes their f32 bits as TF32 (no rounding step, as Triton's TF32
// dot does).
struct Tf32Config {
  using T = float;
  using BM = _128;
  using BN = _128;
  using BK = _32;
  using Stages = _3;
  using TiledMma = TiledMMA<MMA_Atom<SM80_16x8x8_F32TF32TF32F32_TN>,
                            Layout<Shape<_2, _2, _1>, Stride<_2, _1, _1>>, Tile<_32, _32, _8>>;
  using SmemLayoutAtom =
      decltype(composition(Swizzle<3, 2, 3>{}, Layout<Shape<_32, _8>, Stride<_1, _32>>{}));
  using SmemCopyAtom = Copy_Atom<UniversalCopy<tfloat32_t>, tfloat32_t>;
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, T>{},
                                            Layout<Shape<_16, _8>, Stride<_1, _16>>{},
                                            Layout<Shape<_4, _1>>{}));
};

// f32 on CUDA cores, exact (Precision.HIGHEST): CTA tile 128 x 128 x 8, 256 threads of 8 x 8
// outputs, 3 stages.
struct F32Config {
  using T = float;
  using BM = _128;
  using BN = _128;
  using BK = _8;
  using Stages = _3;
  using TiledMma = TiledMMA<MMA_Atom<UniversalFMA<float, float, float, float>>,
                            Layout<Shape<_16, _16, _1>>>;
  using SmemLayoutAtom = Layout<Shape<_128, _8>>;
  using SmemCopyAtom = Copy_Atom<AutoVectorizingCopy, T>;
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, T>{},
                                            Layout<Shape<_32, _8>>{}, Layout<Shape<_4, _1>>{}));
};

// Shared memory of one CTA in the main loop: the A (x) and B (weights) stages, one layout for
// both.
template <class Cfg>
struct SharedStorage {
  using SmemLayout = decltype(tile_to_shape(typename Cfg::SmemLayoutAtom{},
                                            make_shape(typename Cfg::BM{}, typename Cfg::BK{},
                                                       typename Cfg::Stages{})));
  static_assert(Cfg::BM::value == Cfg::BN::value, "A and B share one shared-memory layout");
  cute::ArrayEngine<typename Cfg::T, cosize_v<SmemLayout>> a;
  cute::ArrayEngine<typename Cfg::T, cosize_v<SmemLayout>> b;
};

// Shared memory of one CTA in the epilogue (the same bytes, once the main loop is done): the
// accumulators, staged so that each warp stores consecutive output columns, and the chunk's
// output columns and their bias.
template <class Cfg>
struct EpilogueStorage {
  static constexpr int kRows = Cfg::BM::value;
  static constexpr int kLdc = Cfg::BN::value + 4;  // padded rows: fewer bank conflicts
  float c[Cfg::BM::value * kLdc];
  int32_t columns[Cfg::BN::value];
  float bias[Cfg::BN::value];
};

// The epilogue's stores, shared by the kernels, once the CTA's accumulators are in epi.c
// (row-major, epi.kLdc apart): the chunk's kept columns plus bias, then (chunk 0) the span's
// pruned columns, the bias or zero. Threads tid < threads take part; sync() is their barrier.
template <class TOut, class Epi, class Sync>
__device__ __forceinline__ void StoreSpan(const Params& p, const CtaWork& work, int64_t m0, Epi& epi,
                                          int tid, int threads, Sync&& sync) {
  for (int64_t j = tid; j < work.width; j += threads) {
    const int64_t col = p.columns[work.col0 + j];
    const bool ok = col >= 0 && col < p.n;  // corrupt columns are not written
    epi.columns[j] = ok ? static_cast<int32_t>(col) : -1;
    epi.bias[j] = ok ? p.bias[col] : 0.f;
  }
  sync();
  TOut* y = static_cast<TOut*>(p.y);
  const int64_t rows = Clamp(p.m_rows - m0, 0, Epi::kRows);
  ForRowsCols(tid, threads, rows, work.width, [&](int64_t i, int64_t j) {
    const int32_t col = epi.columns[j];
    if (col >= 0) y[(m0 + i) * p.n + col] = static_cast<TOut>(epi.c[i * Epi::kLdc + j] + epi.bias[j]);
  });
  ForRowsCols(tid, threads, rows, work.pruned_end - work.pruned_begin, [&](int64_t i, int64_t j) {
    const int64_t col = p.pruned[work.pruned_begin + j];
    if (col >= 0 && col < p.n) y[(m0 + i) * p.n + col] = static_cast<TOut>(p.bias[col]);
  });
}

// read(device), called once per device and Key and kept (devices past the table: every time).
template <class Key, class T, class F>
T OncePerDevice(int device, F&& read) {
  constexpr int kMaxDevices = 64;
  if (device < 0 || device >= kMaxDevices) return read(device);
  static std::once_flag once[kMaxDevices];
  static T value[kMaxDevices];
  std::call_once(once[device], [&] { value[device] = read(device); });
  return value[device];
}

// A kernel's dynamic shared-memory limit, raised once per device rather than on every call.
// Key names the kernel (its template arguments): the flags are per instantiation.
template <class... Key>
cudaError_t AllowSharedMemory(const void* kernel, int bytes) {
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  return OncePerDevice<std::tuple<Key...>, cudaError_t>(device, [&](int) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
}

// What the launchers need to know of the current device, read once per device.
struct DeviceInfo {
  int major = 0, minor = 0;  // compute capability
  int sms = 0;               // multiprocessors
  cudaError_t error = cudaSuccess;
};

inline DeviceInfo ReadDeviceInfo(int device) {
  DeviceInfo d;
  if ((d.error = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess ||
      (d.error = cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, device)) != cudaSuccess)
    return d;
  d.error = cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
  return d;
}

inline DeviceInfo CurrentDeviceInfo() {
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    DeviceInfo d;
    d.error = e;
    return d;
  }
  return OncePerDevice<DeviceInfo, DeviceInfo>(device, ReadDeviceInfo);
}

template <class Cfg>
constexpr int SmemBytes() {
  return static_cast<int>(sizeof(SharedStorage<Cfg>) > sizeof(EpilogueStorage<Cfg>)
                              ? sizeof(SharedStorage<Cfg>)
                              : sizeof(EpilogueStorage<Cfg>));
}

}  // namespace cuda
}  // namespace jax_tw
