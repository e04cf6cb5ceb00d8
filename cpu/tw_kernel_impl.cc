// Tile GEMM micro-kernel, compiled once per instruction set (see CMakeLists.txt):
//   TW_ISA_AVX512: 16-wide vectors, micro-tile 12 x 32 (24 accumulators of 32 zmm registers)
//   TW_ISA_AVX2:    8-wide vectors, micro-tile  6 x 16 (12 accumulators of 16 ymm registers)
//   otherwise:      4-wide vectors, micro-tile  4 x 8
// Blocking follows BLIS: a B micro-panel (KC x NR, contiguous, 64-byte aligned) stays in L1
// while the A values, read straight from x's panels at the tile's kept K indices, stream from L2.
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(TW_ISA_AVX512)
#include <immintrin.h>
#endif

#include "tw_kernel.h"

#if defined(TW_ISA_AVX512)
#define TW_NS avx512
#define TW_ISA_NAME "avx512"
constexpr int VL = 16, MR = 12;
#elif defined(TW_ISA_AVX2)
#define TW_NS avx2
#define TW_ISA_NAME "avx2"
constexpr int VL = 8, MR = 6;
#else
#define TW_NS generic
#define TW_ISA_NAME "generic"
constexpr int VL = 4, MR = 4;
#endif

namespace jax_tw {
namespace TW_NS {
namespace {

constexpr int NV = 2;            // vectors per micro-tile row
constexpr int NR = VL * NV;      // micro-tile width
constexpr int64_t KC = 256;      // depth of a block (B micro-panel KC x NR in L1)

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

inline vf Load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// c[MR][NR] (+)= A[kept[q]][MR] * b[q][NR] over q < kc; A = one x panel ([K][MR]).
inline void Micro(int64_t kc, const float* __restrict panel, const int32_t* __restrict kept,
                  const float* __restrict b, float* __restrict c, int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? Load(c + i * ldc + v * VL) : vf{};
  for (int64_t q = 0; q < kc; ++q) {
    const float* a = panel + static_cast<int64_t>(kept[q]) * MR;
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Load(b + q * NR + v * VL);
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i];  // scalar * vector: a broadcast folded into the FMA
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) Store(c + i * ldc + v * VL, acc[i][v]);
}

inline float ToF32(float v) { return v; }
inline float ToF32(uint16_t bits) { return LoadF32(&bits, 0, true); }

// One panel: panel[q][i] = x[m0 + i][q], zero for rows past m. Blocks of 16 columns go through
// a small transpose buffer so that both the reads (row runs) and the writes (panel rows) are
// contiguous: about twice as fast as either plain loop order.
template <class T>
void PackRows(const T* x, int64_t k, int64_t m, float* panel, int64_t m0) {
  const int rows = static_cast<int>(std::min<int64_t>(MR, m - m0));
  float t[MR][16];
  for (int64_t q0 = 0; q0 < k; q0 += 16) {
    const int w = static_cast<int>(std::min<int64_t>(16, k - q0));
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < w; ++j) t[i][j] = i < rows ? ToF32(x[(m0 + i) * k + q0 + j]) : 0.f;
    for (int j = 0; j < w; ++j)
      for (int i = 0; i < MR; ++i) panel[(q0 + j) * MR + i] = t[i][j];
  }
}

#if defined(TW_ISA_AVX512)
// The same for f32 with AVX-512 gathers: 16 columns of a full panel are 192 contiguous floats of
// the panel, 12 vectors each gathered from the 12 rows of x (about 2.5x faster than the
// transpose buffer on a 2048 x 768 x).
void PackRowsGather(const float* x, int64_t k, float* panel, int64_t m0) {
  __m512i index[MR];
  for (int v = 0; v < MR; ++v) {
    alignas(64) int32_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = static_cast<int32_t>(((16 * v + l) % MR) * k + (16 * v + l) / MR);
    index[v] = _mm512_load_si512(lanes);
  }
  const float* rows = x + m0 * k;
  int64_t q0 = 0;
  for (; q0 + 16 <= k; q0 += 16)
    for (int v = 0; v < MR; ++v)
      _mm512_storeu_ps(panel + q0 * MR + 16 * v, _mm512_i32gather_ps(index[v], rows + q0, 4));
  for (int64_t q = q0; q < k; ++q)
    for (int i = 0; i < MR; ++i) panel[q * MR + i] = rows[i * k + q];
}
#endif

// Rows [m0, m0 + npanels * MR) of x into `panels` (rows past M are zero).
void Pack(const TileGemmArgs& args, float* panels, int64_t m0, int64_t npanels) {
  const int64_t k = args.p->k;
  for (int64_t pi = 0; pi < npanels; ++pi) {
    float* panel = panels + pi * k * MR;
    const int64_t first = m0 + pi * MR;
#if defined(TW_ISA_AVX512)
    // Gather indices are int32: (MR - 1) * k + k must fit.
    if (!args.bf16 && first + MR <= args.m && MR * k < (int64_t{1} << 31)) {
      PackRowsGather(static_cast<const float*>(args.x), k, panel, first);
      continue;
    }
#endif
    if (args.bf16) {
      PackRows(static_cast<const uint16_t*>(args.x), k, args.m, panel, first);
    } else {
      PackRows(static_cast<const float*>(args.x), k, args.m, panel, first);
    }
  }
}

// A scratch buffer whose data start on a 64-byte line, so no vector load is split across lines.
struct AlignedBuffer {
  std::vector<float> storage;
  float* Get(size_t n) {
    storage.resize(n + 16);
    auto addr = reinterpret_cast<uintptr_t>(storage.data());
    return storage.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
};

// The tile's weights as f32 micro-panels b[jp][q][NR], zero past the tile's width.
void PackWeights(const TileGemmArgs& args, int64_t tile, float* b) {
  const PackedTilesView& p = *args.p;
  const int64_t depth = p.depth(tile), width = p.width(tile), offset = p.row_offsets[tile];
  const int64_t gp = (width + NR - 1) / NR * NR;
  std::fill(b, b + gp * depth, 0.f);
  for (int64_t q = 0; q < depth; ++q) {
    const int64_t src = (offset + q) * p.g;
    for (int64_t j = 0; j < width; ++j) {
      const float v = LoadF32(args.values, src + j, args.bf16);
      b[(j / NR) * depth * NR + q * NR + j % NR] = v;
    }
  }
}

int64_t WeightSize(const PackedTilesView& p, int64_t tile) {
  return (p.width(tile) + NR - 1) / NR * NR * p.depth(tile);
}

// Rows [m_begin, m_end) of y: pack those rows of x, zero the rows of y, then every tile.
void Rows(const TileGemmArgs& args, int64_t m_begin, int64_t m_end) {
  thread_local AlignedBuffer panel_scratch, cscratch;
  const PackedTilesView& p = *args.p;
  const int64_t rows = m_end - m_begin;
  const int64_t npanels = (rows + MR - 1) / MR;
  float* panels = panel_scratch.Get(npanels * p.k * MR);
  Pack(args, panels, m_begin, npanels);
  float* y = args.y + m_begin * p.n;
  std::fill(y, y + rows * p.n, 0.f);  // pruned columns and empty tiles stay zero
  float* cbuf = cscratch.Get(npanels * MR * ((p.g + NR - 1) / NR * NR));
  for (int64_t tile = 0; tile < p.t; ++tile) {
    const int64_t depth = p.depth(tile), width = p.width(tile);
    if (depth == 0) continue;
    const int64_t gp = (width + NR - 1) / NR * NR;  // width padded to whole micro-tiles
    const int32_t* kept = p.rows + p.row_offsets[tile];
    const float* bbuf = args.weights + args.weight_offsets[tile];
    for (int64_t k0 = 0; k0 < depth; k0 += KC) {
      const int64_t kc = std::min(KC, depth - k0);
      for (int64_t jp = 0; jp < gp; jp += NR) {
        const float* b = bbuf + (jp / NR) * depth * NR + k0 * NR;
        for (int64_t ip = 0; ip < npanels; ++ip)
          Micro(kc, panels + ip * p.k * MR, kept + k0, b, cbuf + ip * MR * gp + jp, gp, k0 > 0);
      }
    }
    // Epilogue: scatter each result column to its place in y (these rows are in L2).
    const int32_t* out_cols = p.columns + tile * p.g;
    for (int64_t i = 0; i < rows; ++i) {
      const float* cr = cbuf + i * gp;
      float* yr = y + i * p.n;
      for (int64_t j = 0; j < width; ++j) yr[out_cols[j]] = cr[j];
    }
  }
}

// Few rows (M <= kSmallRows): no packing at all. Each kept weight row is read once, straight
// from the packed values, and used for every row of x (accumulators acc[m][G] stay in L1).
void SmallTile(const TileGemmArgs& args, int64_t tile) {
  thread_local AlignedBuffer accs, row;
  const PackedTilesView& p = *args.p;
  const int64_t depth = p.depth(tile), width = p.width(tile), offset = p.row_offsets[tile];
  const int64_t gp = (width + VL - 1) / VL * VL;
  const int32_t* out_cols = p.columns + tile * p.g;
  float* acc = accs.Get(args.m * gp);
  float* brow = row.Get(gp);
  std::fill(acc, acc + args.m * gp, 0.f);
  std::fill(brow, brow + gp, 0.f);
  for (int64_t q = 0; q < depth; ++q) {
    const int64_t src = (offset + q) * p.g;
    for (int64_t j = 0; j < width; ++j)
      brow[j] = LoadF32(args.values, src + j, args.bf16);
    const int64_t kq = p.rows[offset + q];
    for (int64_t i = 0; i < args.m; ++i) {
      const float a = LoadF32(args.x, i * p.k + kq, args.bf16);
      float* ar = acc + i * gp;
      for (int64_t j = 0; j < gp; j += VL) Store(ar + j, Load(ar + j) + a * Load(brow + j));
    }
  }
  for (int64_t i = 0; i < args.m; ++i)
    for (int64_t j = 0; j < width; ++j) args.y[i * p.n + out_cols[j]] = acc[i * gp + j];
}

}  // namespace

TileKernel Kernel() {
  return TileKernel{TW_ISA_NAME, MR, WeightSize, PackWeights, Rows, SmallTile};
}

}  // namespace TW_NS
}  // namespace jax_tw
