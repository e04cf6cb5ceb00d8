// The CTA configurations of the CUDA tile GEMM (tw_cuda.cu): tile shapes, MMA atoms, shared-
// memory layouts and copy patterns. A header of its own so that tests/cuda_layout_check.cu can
// check on the host the index assumptions the kernel makes about them.
#pragma once

#include <cute/tensor.hpp>

namespace jax_tw {
namespace cuda {

using namespace cute;

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

// f32 on CUDA cores: CTA tile 128 x 128 x 8, 256 threads of 8 x 8 outputs, 3 stages.
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

// Shared memory of one CTA: the A (x) and B (weights) stages, one layout for both.
template <class Cfg>
struct SharedStorage {
  using SmemLayout = decltype(tile_to_shape(typename Cfg::SmemLayoutAtom{},
                                            make_shape(typename Cfg::BM{}, typename Cfg::BK{},
                                                       typename Cfg::Stages{})));
  static_assert(Cfg::BM::value == Cfg::BN::value, "A and B share one shared-memory layout");
  cute::ArrayEngine<typename Cfg::T, cosize_v<SmemLayout>> a;
  cute::ArrayEngine<typename Cfg::T, cosize_v<SmemLayout>> b;
};

}  // namespace cuda
}  // namespace jax_tw
