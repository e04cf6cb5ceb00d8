// Tile GEMM micro-kernel, compiled once per instruction set (see CMakeLists.txt):
//   TW_ISA_AVX512: 16-wide vectors, micro-tile 12 x 32 (24 accumulators of 32 zmm registers)
//   TW_ISA_AVX2:    8-wide vectors, micro-tile  6 x 16 (12 accumulators of 16 ymm registers)
//   otherwise:      4-wide vectors, micro-tile  4 x 8
// Blocking follows BLIS: a B micro-panel (KC x NR: KC rows of NR weights, read in place from the
// packed values or from a per-call copy, see WeightsInPlace) stays in L1 while the A values,
// read from x's panels (or x itself) at the tile's kept K indices, stream from L2.
#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(TW_ISA_AVX512) || defined(TW_ISA_AVX2)
#include <immintrin.h>
#endif

#include "tw_kernel.h"

#if defined(TW_ISA_AVX512) && defined(TW_AMX)
#define TW_NS avx512_amx
#define TW_ISA_NAME "avx512-amx"
constexpr int VL = 16, MR = 12;
#elif defined(TW_ISA_AVX512) && defined(TW_DPBF16)
#define TW_NS avx512_bf16
#define TW_ISA_NAME "avx512-bf16"
constexpr int VL = 16, MR = 12;
#elif defined(TW_ISA_AVX512)
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
// bf16 x in pairs of kept K indices (RowsPairs): on AMX tiles or by VDPBF16PS.
#if defined(TW_AMX) || defined(TW_DPBF16)
#define TW_PAIRS
#endif

namespace jax_tw {
namespace TW_NS {
namespace {

constexpr int NV = 2;            // vectors per micro-tile row
constexpr int NR = VL * NV;      // micro-tile width
constexpr int64_t KC = 256;      // depth of a block (B micro-panel KC x NR in L1)

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

inline vf Load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
// VL bf16 values (raw bits) as f32: widened and shifted into the high half of each lane. On
// AVX-512 one VPMOVZXWD from memory: the generic form compiled to two 256-bit widenings and an
// insert (bf16 few rows, weights in place: 1.10-1.44x at M = 1, 0.96-1.03x at M = 32).
inline vf Load(const uint16_t* p) {
#if defined(TW_ISA_AVX512)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#else
  typedef uint16_t vh __attribute__((vector_size(VL * sizeof(uint16_t))));
  typedef uint32_t vu __attribute__((vector_size(VL * sizeof(uint32_t))));
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
#endif
}
inline void Store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// Vectors of 4 and 8 floats, for walks of few rows (Residue); any vector type V.
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
template <class V> inline V LoadAs(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
// A whole vector of bf16 values (raw bits) as f32 (Load); V is vf.
template <class V> inline V LoadAs(const uint16_t* p) {
  static_assert(sizeof(V) == sizeof(vf), "bf16 rows are read a whole vector at a time");
  return Load(p);
}
template <class V> inline void StoreAs(float* p, V v) { std::memcpy(p, &v, sizeof v); }

// erf(x) within 5e-7: x P(x^2) / Q(x^2) on [-4, 4] (+-1 in f32 beyond), the rational form of
// XLA's CPU backend (Eigen's generic_fast_erf_float). NaN stays NaN.
inline vf Erf(vf x) {
  const vf four = vf{} + 4.f;
  x = x > four ? four : x;
  x = x < -four ? -four : x;
  const vf x2 = x * x;
  vf p = vf{} - 2.72614225801306e-10f;
  for (float a : {2.77068142495902e-08f, -2.10102402082508e-06f, -5.69250639462346e-05f,
                  -7.34990630326855e-04f, -2.95459980854025e-03f, -1.60960333262415e-02f})
    p = p * x2 + a;
  vf q = vf{} - 1.45660718464996e-05f;
  for (float b : {-2.13374055278905e-04f, -1.68282697438203e-03f, -7.37332916720468e-03f,
                  -1.42647390514189e-02f})
    q = q * x2 + b;
  return x * p / q;
}

inline vf Activate(vf v, Activation act) {
  switch (act) {
    case Activation::kRelu: return v < vf{} ? vf{} : v;
    case Activation::kGelu: return 0.5f * v * (1.f + Erf(v * 0.70710678118654752f));
    default: return v;
  }
}

// The activation over s[0, len) in place.
inline void ActivateRow(float* s, int64_t len, Activation act) {
  if (act == Activation::kNone) return;
  int64_t j = 0;
  for (; j + VL <= len; j += VL) Store(s + j, Activate(Load(s + j), act));
  if (j < len) {
    float tail[VL] = {};
    std::memcpy(tail, s + j, (len - j) * sizeof(float));
    Store(tail, Activate(Load(tail), act));
    std::memcpy(s + j, tail, (len - j) * sizeof(float));
  }
}

inline float ToF32(float v) { return v; }
inline float ToF32(uint16_t bits) { return LoadF32(&bits, 0, true); }

// The bf16 value *p as f32 in every lane: with AVX512BW a 16-bit broadcast from memory shifted
// into the high halves, with no trip through a general register. Micro uses it where the
// weights are bf16 too (read in place, few rows: 1.00-1.17x at M = 8-32); with f32 weights the
// scalar route measured as fast or faster (0.90-1.01x this way).
inline vf Broadcast(const uint16_t* p) {
#if defined(TW_ISA_AVX512) && defined(__AVX512BW__)
  vf v;
  const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_set1_epi16(static_cast<short>(*p)), 16));
  std::memcpy(&v, &w, sizeof v);
  return v;
#else
  return vf{} + ToF32(*p);
#endif
}

// c[R][W * VL] (+)= A[kept[q]][R] * b[q][W * VL] over q < kc (W: vectors per row, NV in a
// micro-tile), b's rows ldb values apart (f32, or bf16
// widened as they are loaded: the few-rows path reads bf16 weights in place). A is one x panel
// (K rows of MR values, lda apart: MR in a packed panel, ldxt in an item's x feature-major,
// Rows) or, kInPlace, R rows of x (f32 or bf16) read in place, lda values apart: the
// many-rows path's x with few kept weights (TileGemmArgs::direct_x, R = MR) and the few-rows
// path (any R up to MR).
template <bool kInPlace, int R = MR, class T = float, class WT = float, int W = NV>
inline void Micro(int64_t kc, const T* __restrict a0, int64_t lda, const int32_t* __restrict kept,
                  const WT* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc, bool accumulate) {
  vf acc[R][W];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < W; ++v) acc[i][v] = accumulate ? Load(c + i * ldc + v * VL) : vf{};
  for (int64_t q = 0; q < kc; ++q) {
    const T* a = a0 + static_cast<int64_t>(kept[q]) * (kInPlace ? 1 : lda);
    vf bv[W];
    for (int v = 0; v < W; ++v) bv[v] = Load(b + q * ldb + v * VL);
    for (int i = 0; i < R; ++i) {
      const T* ai_at = a + (kInPlace ? i * lda : i);
      // f32 weights: scalar * vector, a broadcast folded into the FMA; bf16 weights: Broadcast.
      const auto ai = [ai_at] {
        if constexpr (std::is_same_v<WT, uint16_t>) return Broadcast(ai_at);
        else return ToF32(*ai_at);
      }();
      for (int v = 0; v < W; ++v) acc[i][v] += ai * bv[v];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < W; ++v) Store(c + i * ldc + v * VL, acc[i][v]);
}

// One panel: panel[q][i] = x[m0 + i][q], zero for rows past m. Blocks of 16 columns go through
// a small transpose buffer so that both the reads (row runs) and the writes (panel rows) are
// contiguous: about twice as fast as either plain loop order.
template <class T>
void PackRows(const T* x, int64_t ld, int64_t k, int64_t m, float* panel, int64_t m0) {
  const int rows = static_cast<int>(std::min<int64_t>(MR, m - m0));
  float t[MR][16];
  for (int64_t q0 = 0; q0 < k; q0 += 16) {
    const int w = static_cast<int>(std::min<int64_t>(16, k - q0));
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < w; ++j) t[i][j] = i < rows ? ToF32(x[(m0 + i) * ld + q0 + j]) : 0.f;
    for (int j = 0; j < w; ++j)
      for (int i = 0; i < MR; ++i) panel[(q0 + j) * MR + i] = t[i][j];
  }
}

#if defined(TW_ISA_AVX512)
// Sixteen consecutive values of x's row as f32.
inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const uint16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

// A full panel (all MR = 12 rows inside x) by 16 x 16 register transposes: 16 columns of the 12
// rows become 16 panel rows, each stored as its first MR lanes (masked stores). f32 and bf16.
template <class T>
void PackRowsAvx512(const T* x, int64_t ld, int64_t k, float* panel, int64_t m0) {
  const T* r = x + m0 * ld;
  constexpr __mmask16 kRow = (1 << MR) - 1;
  int64_t q0 = 0;
  for (; q0 + 16 <= k; q0 += 16) {
    __m512 a[12], b[12];
    for (int i = 0; i < 12; i += 2) {
      const __m512 r0 = Load16(r + i * ld + q0), r1 = Load16(r + (i + 1) * ld + q0);
      a[i] = _mm512_unpacklo_ps(r0, r1);      // per 128-bit lane L: rows i, i+1 at 4L, 4L+1
      a[i + 1] = _mm512_unpackhi_ps(r0, r1);  // ... at 4L+2, 4L+3
    }
    // b[4g + c], lane L: rows 4g..4g+3 at column 4L + c.
    for (int g = 0; g < 3; ++g) {
      b[4 * g + 0] = _mm512_shuffle_ps(a[4 * g], a[4 * g + 2], 0x44);
      b[4 * g + 1] = _mm512_shuffle_ps(a[4 * g], a[4 * g + 2], 0xEE);
      b[4 * g + 2] = _mm512_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0x44);
      b[4 * g + 3] = _mm512_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0xEE);
    }
    // Column 4L + c is lane L of b[c], b[4 + c], b[8 + c] (and a fourth, unused lane).
    float* out = panel + q0 * MR;
    for (int c = 0; c < 4; ++c) {
      const __m512 e0 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x44);  // b[c].L0 L1, b[4+c].L0 L1
      const __m512 e1 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xEE);  // ... L2 L3
      _mm512_mask_storeu_ps(out + (0 + c) * MR, kRow, _mm512_shuffle_f32x4(e0, b[8 + c], 0x08));
      _mm512_mask_storeu_ps(out + (4 + c) * MR, kRow, _mm512_shuffle_f32x4(e0, b[8 + c], 0x1D));
      _mm512_mask_storeu_ps(out + (8 + c) * MR, kRow, _mm512_shuffle_f32x4(e1, b[8 + c], 0xE8));
      _mm512_mask_storeu_ps(out + (12 + c) * MR, kRow, _mm512_shuffle_f32x4(e1, b[8 + c], 0xFD));
    }
  }
  for (int64_t q = q0; q < k; ++q)
    for (int i = 0; i < MR; ++i) panel[q * MR + i] = ToF32(r[i * ld + q]);
}
#endif

#if defined(TW_ISA_AVX2)
// Eight consecutive values of x's row as f32.
inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 Load8(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// A full panel (all MR = 6 rows inside x) by 8 x 8 register transposes: 8 columns of the 6 rows
// (and two zero rows) become 8 panel rows of 6 values, stored 8 wide so that each store's last
// two lanes are overwritten by the next one (the last spills 2 floats past the block: the next
// block's, or the slack of the panel buffer).
template <class T>
void PackRowsAvx2(const T* x, int64_t ld, int64_t k, float* panel, int64_t m0) {
  const T* r = x + m0 * ld;
  int64_t q0 = 0;
  const __m256 z = _mm256_setzero_ps();
  for (; q0 + 8 <= k; q0 += 8) {
    const __m256 a0 = Load8(r + q0), a1 = Load8(r + ld + q0), a2 = Load8(r + 2 * ld + q0),
                 a3 = Load8(r + 3 * ld + q0), a4 = Load8(r + 4 * ld + q0), a5 = Load8(r + 5 * ld + q0);
    const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
    const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
    const __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, z, 0x44), s5 = _mm256_shuffle_ps(t4, z, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, z, 0x44), s7 = _mm256_shuffle_ps(t5, z, 0xEE);
    // Column c (c < 4) is (s_c low 128, s_{c+4} low 128); column c + 4 the high halves.
    float* out = panel + q0 * MR;
    _mm256_storeu_ps(out + 0 * MR, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(out + 1 * MR, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(out + 2 * MR, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(out + 3 * MR, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(out + 4 * MR, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(out + 5 * MR, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(out + 6 * MR, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(out + 7 * MR, _mm256_permute2f128_ps(s3, s7, 0x31));
  }
  for (int64_t q = q0; q < k; ++q)
    for (int i = 0; i < MR; ++i) panel[q * MR + i] = ToF32(r[i * ld + q]);
}
#endif

// Whether panel pi of the rows from m0 is read in place from x (TileGemmArgs::direct_x): all
// its MR rows are inside x.
inline bool InPlace(const TileGemmArgs& args, int64_t m0, int64_t pi) {
  return args.direct_x && m0 + (pi + 1) * MR <= args.m;
}

// Rows [m0, m0 + npanels * MR), columns [kb, kb + kw) of x into `panels`, kw x MR floats each
// (rows past M are zero), but for panels read in place.
void Pack(const TileGemmArgs& args, float* panels, int64_t m0, int64_t npanels, int64_t kb, int64_t kw) {
  const int64_t ld = args.p->k;
  const float* xf = static_cast<const float*>(args.x) + kb;
  const uint16_t* xh = static_cast<const uint16_t*>(args.x) + kb;
  for (int64_t pi = 0; pi < npanels; ++pi) {
    if (InPlace(args, m0, pi)) continue;
    float* panel = panels + pi * kw * MR;
    const int64_t first = m0 + pi * MR;
#if defined(TW_ISA_AVX512)
    if (first + MR <= args.m) {
      if (args.bf16) PackRowsAvx512(xh, ld, kw, panel, first);
      else PackRowsAvx512(xf, ld, kw, panel, first);
      continue;
    }
#endif
#if defined(TW_ISA_AVX2)
    if (first + MR <= args.m) {
      if (args.bf16) PackRowsAvx2(xh, ld, kw, panel, first);
      else PackRowsAvx2(xf, ld, kw, panel, first);
      continue;
    }
#endif
    if (args.bf16) PackRows(xh, ld, kw, args.m, panel, first);
    else PackRows(xf, ld, kw, args.m, panel, first);
  }
}

// A scratch buffer whose data start on a 64-byte line, so no vector load is split across lines;
// VL floats of slack past the end, for vector loads that start on its last values.
struct AlignedBuffer {
  std::vector<float> storage;
  float* Get(size_t n) {
    storage.resize(n + 16 + VL);
    auto addr = reinterpret_cast<uintptr_t>(storage.data());
    return storage.data() + ((64 - addr % 64) % 64) / sizeof(float);
  }
};

// The K blocks of a layer (kKBlock): nblocks blocks of kbw columns of x, the last the rest.
inline void KBlocks(int64_t k, int64_t* nblocks, int64_t* kbw) {
  *nblocks = (k + kKBlock - 1) / kKBlock;
  *kbw = (k + *nblocks - 1) / *nblocks;
}

// The tile's kept rows inside K block [kb, kb + kw): [*q0, *q1) of its kept list.
inline void BlockRows(const int32_t* kept, int64_t depth, int64_t kb, int64_t kw, int64_t* q0, int64_t* q1) {
  *q0 = std::lower_bound(kept, kept + depth, static_cast<int32_t>(kb)) - kept;
  *q1 = std::lower_bound(kept + *q0, kept + depth, static_cast<int32_t>(kb + kw)) - kept;
}

// A tile's width padded to whole micro-tiles (NR columns).
inline int64_t PaddedWidth(const PackedTilesView& p, int64_t tile) { return (p.width(tile) + NR - 1) / NR * NR; }

// f32 weights are read in place, straight from the packed values ([r][g], rows g floats apart),
// when whole micro-panels fit each row (g a multiple of NR): no per-call copy. Columns past a
// tile's width are then read too (the row's padding); their results are never stored.
// WeightSize is then 0, so TileGemm never calls PackWeights.
inline bool WeightsInPlace(const TileGemmArgs& args) { return !args.bf16 && args.p->g % NR == 0; }

// The tile's weights as f32 micro-panels b[jp][q][NR], zero past the tile's width.
void PackWeights(const TileGemmArgs& args, int64_t tile, float* b) {
  const PackedTilesView& p = *args.p;
  const int64_t depth = p.depth(tile), width = p.width(tile), offset = p.row_offsets[tile];
  for (int64_t jp = 0; jp < width; jp += NR) {
    const int64_t w = std::min<int64_t>(NR, width - jp);
    float* bp = b + (jp / NR) * depth * NR;
    for (int64_t q = 0; q < depth; ++q) {
      const int64_t src = (offset + q) * p.g + jp;
      float* dst = bp + q * NR;
      // Plain loops, not memcpy: rows of at most NR values, where a library call costs more
      // than the copy (the few-rows path copies per work item).
      if (args.bf16) {
        const uint16_t* v = static_cast<const uint16_t*>(args.values) + src;
        if (w == NR) {  // a whole micro-tile row: widened a vector at a time
          for (int i = 0; i < NV; ++i) Store(dst + i * VL, Load(v + i * VL));
          continue;
        }
        for (int64_t j = 0; j < w; ++j) dst[j] = ToF32(v[j]);
      } else {
        const float* v = static_cast<const float*>(args.values) + src;
#if defined(TW_ISA_AVX512)
        for (int i = 0; i < NV; ++i) {  // the whole micro-tile row, zero past w: masked loads
          const int64_t n = std::clamp<int64_t>(w - 16 * i, 0, 16);
          _mm512_storeu_ps(dst + 16 * i, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), v + 16 * i));
        }
        continue;
#else
        for (int64_t j = 0; j < w; ++j) dst[j] = v[j];
#endif
      }
      for (int64_t j = w; j < NR; ++j) dst[j] = 0.f;
    }
  }
}

int64_t WeightSize(const TileGemmArgs& args, int64_t tile) {
  return WeightsInPlace(args) ? 0 : PaddedWidth(*args.p, tile) * args.p->depth(tile);
}

// x[i][q] for the rows of a work item, as the residue reads them: row i at xt[q * ldxt + i],
// the item's rows of x transposed (TransposeRows; ldxt a multiple of VL, 64-byte aligned, zero
// past the item's rows), or for few rows x transposed once per call (TileGemmArgs::xt, from
// the item's first row: unaligned, ldxt = M). Whole vectors are read past the item's rows
// (other rows, other columns of x, or at the end the slack): those lanes are never added to
// the output.
struct PanelRows {
  const float* xt;
  int64_t ldxt;
  // bf16 x feature-major as bf16 instead (Bf16Rows; RowsPairs, Rows): the residue walks load
  // half the bytes. xt is then null.
  const uint16_t* xt16 = nullptr;
};

// Whether an item of `rows` rows keeps its rows of x for the residue as bf16 (PanelRows::xt16):
// bf16 x on AVX-512 (TEW 75% + 5% and 12.5%, M = 24-4096: 1.03-1.35x; on AVX2 0.74-0.82x,
// BUILD_NOTES.md), and more rows than the walks that read f32 take (WalkOne for one row, the
// walks of 4 and 8 rows in Residue).
constexpr bool Bf16Rows(bool bf16, int64_t rows) { return VL == 16 && bf16 && rows > 8; }

// Room in `buffer` for an item's `rows` rows of x feature-major, K x ldxt, for the residue: as
// bf16 bits in *xt16 where Bf16Rows, else as f32 in *xt (the other null); neither without one.
void ResidueRows(AlignedBuffer& buffer, const PackedTilesView& p, bool bf16, int64_t rows, int64_t ldxt,
                 float** xt, uint16_t** xt16) {
  *xt = nullptr;
  *xt16 = nullptr;
  if (p.e == 0) return;
  if (Bf16Rows(bf16, rows)) *xt16 = reinterpret_cast<uint16_t*>(buffer.Get((p.k * ldxt + 1) / 2));
  else *xt = buffer.Get(p.k * ldxt);
}

#if defined(TW_ISA_AVX512)
// r[0..16) transposed in place: r[j] lane i = r[i] lane j (before).
inline void Transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4g + c], 128-bit lane L: rows 4g..4g+3 at column 4L + c.
  for (int g = 0; g < 4; ++g) {
    r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 e0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);  // L0 L2 of each
    const __m512 e1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);  // L1 L3
    const __m512 e2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const __m512 e3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_f32x4(e0, e2, 0x88);       // column c: lane 0 of all
    t[4 + c] = _mm512_shuffle_f32x4(e1, e3, 0x88);   // column 4 + c: lane 1
    t[8 + c] = _mm512_shuffle_f32x4(e0, e2, 0xDD);   // column 8 + c: lane 2
    t[12 + c] = _mm512_shuffle_f32x4(e1, e3, 0xDD);  // column 12 + c: lane 3
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// Rows [m0, m0 + rows), columns [kb, kb + kw) of x feature-major as f32 (PanelRows::xt), or
// bf16 x as bf16 bits (O = uint16_t, PanelRows::xt16): xt[q][i] = x[m0 + i][kb + q], zero for
// rows up to ldxt (a multiple of VL). AVX-512: 16 x 16 register transposes.
template <class T, class O>
void TransposeRows(const T* x, int64_t ld, int64_t rows, int64_t kw, O* xt, int64_t ldxt) {
  constexpr bool f32 = std::is_same<O, float>::value;
  static_assert(f32 || std::is_same<T, uint16_t>::value, "bf16 rows are made from bf16 x");
  const auto convert = [](T v) -> O {
    if constexpr (f32) return ToF32(v);
    else return v;
  };
  int64_t i0 = 0;
#if defined(TW_ISA_AVX512)
  for (; i0 + 16 <= rows; i0 += 16) {
    int64_t q0 = 0;
    for (; q0 + 16 <= kw; q0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = Load16(x + (i0 + i) * ld + q0);
      Transpose16x16(r);  // r[j]: column q0 + j of the 16 rows
      for (int j = 0; j < 16; ++j) {
        O* out = xt + (q0 + j) * ldxt + i0;
        if constexpr (f32) {
          _mm512_store_ps(out, r[j]);
        } else {  // back to bf16: the widened values' high halves
          const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(r[j]), 16));
          _mm256_store_si256(reinterpret_cast<__m256i*>(out), h);
        }
      }
    }
    for (int64_t q = q0; q < kw; ++q)
      for (int64_t i = i0; i < i0 + 16; ++i) xt[q * ldxt + i] = convert(x[i * ld + q]);
  }
#endif
  for (int64_t q = 0; q < kw; ++q) {
    O* out = xt + q * ldxt;
    for (int64_t i = i0; i < rows; ++i) out[i] = convert(x[i * ld + q]);
    for (int64_t i = rows; i < ldxt; ++i) out[i] = O(0);
  }
}

// out[0, NV * VL) = sum over e in [begin, end) of v[e] * xt[kr[e]][0, NV * VL): one residue
// column for NV vectors of rows (whole-vector loads). At least 8 independent accumulators: NV
// for each of U interleaved weights (U > 1 when a walk is narrow, as with few rows), so that
// the adds do not wait on one another.
template <int NV, class V = vf, class T = float>
inline void ResidueColumn(const T* __restrict xt, int64_t ldxt, const int32_t* __restrict kr,
                          const float* __restrict v, int64_t begin, int64_t end, float* __restrict out) {
  constexpr int U = (8 + NV - 1) / NV, L = sizeof(V) / sizeof(float);
  V a[U][NV] = {};
  int64_t e = begin;
  for (; e + U <= end; e += U)
    for (int u = 0; u < U; ++u) {
      const T* row = xt + static_cast<int64_t>(kr[e + u]) * ldxt;
      const float ve = v[e + u];
      for (int j = 0; j < NV; ++j) a[u][j] += LoadAs<V>(row + j * L) * ve;
    }
  for (; e < end; ++e) {
    const T* row = xt + static_cast<int64_t>(kr[e]) * ldxt;
    const float ve = v[e];
    for (int j = 0; j < NV; ++j) a[0][j] += LoadAs<V>(row + j * L) * ve;
  }
  for (int u = 1; u < U; ++u)
    for (int j = 0; j < NV; ++j) a[0][j] += a[u][j];
  for (int j = 0; j < NV; ++j) StoreAs<V>(out + j * L, a[0][j]);
}

// Most rows of x one residue walk covers: 15 vectors (AVX2: 15 accumulators and a broadcast).
constexpr int kMaxVectors = 15;
constexpr int64_t kResidueBlock = kMaxVectors * VL;

// s[i][cols[c] - lo] += sums[c][i] for c < n columns and i < rows (s: lds floats per row).
void AddColumns(const float (*sums)[kResidueBlock], const int32_t* cols, int n, int64_t rows, int64_t lo,
                float* s, int64_t lds) {
  int64_t i0 = 0;
#if defined(TW_ISA_AVX2) || defined(TW_ISA_AVX512)
  // Eight consecutive columns: 8 x 8 register transposes, each row's 8 sums one vector add
  // (256-bit: AVX-512 machines run AVX2 too).
  if (n == 8 && cols[7] - cols[0] == 7) {
    for (; i0 + 8 <= rows; i0 += 8) {
      __m256 r[8];
      for (int c = 0; c < 8; ++c) r[c] = _mm256_load_ps(sums[c] + i0);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 row[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                             _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                             _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                             _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      for (int j = 0; j < 8; ++j) {
        float* out = s + (i0 + j) * lds + (cols[0] - lo);
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), row[j]));
      }
    }
  }
#endif
  for (int c = 0; c < n; ++c) {
    float* out = s + (cols[c] - lo);
    for (int64_t i = i0; i < rows; ++i) out[i * lds] += sums[c][i];
  }
}

// The end of the column's run of residue weights that starts at `begin` (before e1): cols is
// sorted (Validate), so eight at a time while the eighth is still in the column (a test per
// weight took 40% of a one-row walk).
inline int64_t ColumnEnd(const int32_t* cols, int64_t begin, int64_t e1) {
  const int32_t col = cols[begin];
  int64_t end = begin + 1;
  while (end + 8 <= e1 && cols[end + 7] == col) end += 8;
  while (end < e1 && cols[end] == col) ++end;
  return end;
}

constexpr int kGroup = 8;  // residue columns added to the span buffer together (AddColumns)

// One walk over residue weights [e0, e1) (sorted by column, then row) for NV vectors of rows of
// xt (f32, or bf16 bits): each column's sums (ResidueColumn) added to its column of s, kGroup
// columns at a time.
template <int NV, class V = vf, class T = float>
void Walk(const T* xt, int64_t ldxt, const int32_t* cols, const int32_t* kr, const float* v,
          int64_t e0, int64_t e1, int64_t rows, int64_t lo, float* s, int64_t lds) {
  alignas(64) float sums[kGroup][kResidueBlock];
  int32_t group[kGroup];
  int n = 0;
  for (int64_t begin = e0, end; begin < e1; begin = end) {
    const int32_t col = cols[begin];
    end = ColumnEnd(cols, begin, e1);
    ResidueColumn<NV, V, T>(xt, ldxt, kr, v, begin, end, sums[n]);
    group[n++] = col;
    if (n == kGroup || end == e1) {
      AddColumns(sums, group, n, rows, lo, s, lds);
      n = 0;
    }
  }
}

template <class T>
using WalkFn = decltype(&Walk<1, vf, T>);
template <class T, int... N>
constexpr std::array<WalkFn<T>, sizeof...(N)> WalkTable(std::integer_sequence<int, N...>) {
  return {&Walk<N + 1, vf, T>...};
}
// kWalk<T>[nv - 1]: Walk<nv> over rows of x as T (float, or bf16 bits as uint16_t).
template <class T>
constexpr auto kWalk = WalkTable<T>(std::make_integer_sequence<int, kMaxVectors>{});

#if defined(TW_ISA_AVX512)
// Walk for one row of x (ldxt floats between its K values): per column, a dot product of its
// weights with x gathered at their K indices, 16 at a time. A walk of vectors would load a
// whole vector of x per weight for one useful lane. Needs k * ldxt < 2**31 (32-bit gathers).
// It checks the weights as it goes, instead of ResidueSound's pass before it (at M = 1, without
// that pass TEW 75% + 12.5% and EW 90% ran 1.16-1.56x faster, BUILD_NOTES.md): each column's
// weights in that column, rows in [0, k) and rising, the columns rising inside [lo, hi); it
// returns false at the first that is not, before reading x or writing s with it.
bool WalkOne(const float* xt, int64_t ldxt, const int32_t* cols, const int32_t* kr, const float* v,
             int64_t e0, int64_t e1, int64_t lo, int64_t hi, int64_t k, float* s) {
  const __m512i ld = _mm512_set1_epi32(static_cast<int32_t>(ldxt));
  const __m512i kv = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(k, INT32_MAX)));
  int64_t last = lo - 1;  // the previous column
  for (int64_t begin = e0, end; begin < e1; begin = end) {
    const int32_t col = cols[begin];
    if (col <= last || col >= hi) return false;
    last = col;
    end = ColumnEnd(cols, begin, e1);
    const __m512i cv = _mm512_set1_epi32(col);
    __m512 acc = _mm512_setzero_ps();
    // Lane 0 of the column's first 16 has no row before it in the column.
    __mmask16 first = 1;
    for (int64_t e = begin; e < end; e += 16, first = 0) {
      const __mmask16 m = end - e >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (end - e)) - 1);
      const __m512i r = _mm512_maskz_loadu_epi32(m, kr + e);
      const __m512i before = _mm512_maskz_loadu_epi32(m & ~first, kr + e - 1);
      const __mmask16 ok = _mm512_mask_cmplt_epu32_mask(m, r, kv) &
                           (_mm512_mask_cmpgt_epi32_mask(m, r, before) | first) &
                           _mm512_mask_cmpeq_epi32_mask(m, _mm512_maskz_loadu_epi32(m, cols + e), cv);
      if (ok != m) return false;
      const __m512i idx = ldxt != 1 ? _mm512_mullo_epi32(r, ld) : r;
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, xt, 4);
      acc = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, v + e), acc);
    }
    s[col - lo] += _mm512_reduce_add_ps(acc);
  }
  return true;
}
#endif

// Whether Residue walks these rows by WalkOne, which checks the weights itself.
inline bool ChecksAsItWalks(const TileGemmArgs& args, const PanelRows& x, int64_t rows) {
#if defined(TW_ISA_AVX512)
  return rows == 1 && args.p->k * x.ldxt < (int64_t{1} << 31);
#else
  return false;
#endif
}

// Adds residue weights [e0, e1) (sorted by column, then row) times rows of x to their columns
// of the span buffer s (rows x lds, column lo first). The rows go in as few walks over the
// span's weights as there can be, of equal width, each at most kResidueBlock rows: per weight,
// one aligned vector load of its row of xt and one FMA per VL rows, into independent
// accumulators; each column's sums are then added to its column of s, eight columns at a time.
// A walk costs about the same per weight whatever its width (the first load of a row of xt at
// a random K index dominates), so items slightly longer than a walk are cut to one
// (RowsPerItem). (Cutting K into ranges whose rows fit L2, and prefetching the row 8 weights
// ahead, measured no faster.) One row of x checks the weights as it walks them (WalkOne,
// ChecksAsItWalks): false if they are corrupt. Other walks read weights already checked
// (ResidueSound).
inline bool Residue(const TileGemmArgs& args, const PanelRows& x, int64_t rows, int64_t e0, int64_t e1,
                    int64_t lo, int64_t hi, float* s, int64_t lds, std::vector<float>& vbuf) {
  if (rows <= 0) return true;
  if (e0 > e1) return false;
  const float* v = static_cast<const float*>(args.residue_values);
  if (args.bf16) {
    vbuf.resize(e1 - e0);
    for (int64_t e = e0; e < e1; ++e) vbuf[e - e0] = LoadF32(args.residue_values, e, true);
    v = vbuf.data() - e0;
  }
#if defined(TW_ISA_AVX512)
  if (ChecksAsItWalks(args, x, rows))
    return WalkOne(x.xt, x.ldxt, args.p->residue_cols, args.p->residue_rows, v, e0, e1, lo, hi, args.p->k, s);
#endif
  // Up to 4 or 8 rows, a walk loads 4 or 8 floats per weight, not a whole vector (TEW 75% + 5%
  // and EW 80% at M = 2-8: 1.14-1.44x, BUILD_NOTES.md).
  const int32_t *cols = args.p->residue_cols, *kr = args.p->residue_rows;
  if constexpr (VL > 4) {
    if (rows <= 4) {
      Walk<1, vf4>(x.xt, x.ldxt, cols, kr, v, e0, e1, rows, lo, s, lds);
      return true;
    }
  }
  if constexpr (VL > 8) {
    if (rows <= 8) {
      Walk<1, vf8>(x.xt, x.ldxt, cols, kr, v, e0, e1, rows, lo, s, lds);
      return true;
    }
  }
  const int64_t vectors = (rows + VL - 1) / VL, walks = (vectors + kMaxVectors - 1) / kMaxVectors;
  const int64_t width = (vectors + walks - 1) / walks * VL;  // rows per walk
  for (int64_t r0 = 0; r0 < rows; r0 += width) {
    const int64_t nr = std::min(width, rows - r0), nv = (nr + VL - 1) / VL;
    if (x.xt16) kWalk<uint16_t>[nv - 1](x.xt16 + r0, x.ldxt, cols, kr, v, e0, e1, nr, lo, s + r0 * lds, lds);
    else kWalk<float>[nv - 1](x.xt + r0, x.ldxt, cols, kr, v, e0, e1, nr, lo, s + r0 * lds, lds);
  }
  return true;
}

// dst[0, len) = src[0, len), f32. With `stream` (a large output, TileGemmArgs::stream), the
// whole 64-byte lines of dst are written with non-temporal stores: no read-for-ownership of y's
// lines, which the kernel never reads (sfence before the item ends: Epilogue).
inline void StoreRow(float* dst, const float* src, int64_t len, bool stream) {
#if defined(TW_ISA_AVX512) || defined(TW_ISA_AVX2)
  if (stream) {
    const int64_t head = std::min<int64_t>(len, ((64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64) / sizeof(float));
    std::memcpy(dst, src, head * sizeof(float));
    int64_t j = head;
    for (; j + 16 <= len; j += 16) {
#if defined(TW_ISA_AVX512)
      _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#else
      _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
      _mm256_stream_ps(dst + j + 8, _mm256_loadu_ps(src + j + 8));
#endif
    }
    std::memcpy(dst + j, src + j, (len - j) * sizeof(float));
    return;
  }
#endif
  std::memcpy(dst, src, len * sizeof(float));
}

#if defined(TW_ISA_AVX512)
// A span's row as 16-float chunks aligned to y's 64-byte lines (AVX-512, f32 output): chunk j
// covers span columns [16 j - phase, 16 j - phase + 16), where phase is y_row + lo's offset in
// its line. kept[j]: the chunk's tile columns, whose results are the next popcount(kept[j])
// values of the tile's row from offset[j] on (the columns are sorted); inside[j]: its columns
// within the span. One masked expand-load per chunk then places the tile's results and zeros,
// with no scalar scatter and no buffer.
struct SpanChunks {
  int64_t phase = -1, count = 0;
  std::vector<uint16_t> kept, inside;
  std::vector<int32_t> offset;
  void Make(int64_t ph, int64_t len, const int32_t* out, int64_t width, int64_t lo) {
    phase = ph;
    count = (ph + len + 15) / 16;
    kept.assign(count, 0);
    inside.assign(count, 0);
    offset.assign(count + 1, 0);
    for (int64_t c = 0; c < len; ++c) inside[(c + ph) / 16] |= uint16_t(1u << ((c + ph) % 16));
    for (int64_t j = 0; j < width; ++j) {
      const int64_t c = out[j] - lo + ph;
      kept[c / 16] |= uint16_t(1u << (c % 16));
      ++offset[c / 16 + 1];
    }
    for (int64_t j = 0; j < count; ++j) offset[j + 1] += offset[j];
  }
};

// 16 f32 to bf16 bits (in the low halves of 32-bit lanes), as ToBF16: nearest even, NaN stays NaN.
inline __m512i ToBF16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
}

// dst[0, n) = src[0, n) as bf16, n <= 16.
inline void StoreBF16(uint16_t* dst, __m512 v, int64_t n) {
  const __m256i h = _mm512_cvtepi32_epi16(ToBF16x16(v));
  if (n == 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
  } else {
#if defined(TW_PAIRS)
    _mm256_mask_storeu_epi16(dst, static_cast<__mmask16>((1u << n) - 1), h);
#else
    alignas(32) uint16_t tmp[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), h);
    std::memcpy(dst, tmp, n * sizeof(uint16_t));
#endif
  }
}

// Chunk j of a span's row: bias (or 0) plus the tile's results in its kept columns (SpanChunks).
inline __m512 ExpandChunk(const SpanChunks& ch, const float* ci, const float* b, int64_t j) {
  const __m512 v = _mm512_maskz_expandloadu_ps(ch.kept[j], ci + ch.offset[j]);
  return b ? _mm512_add_ps(v, _mm512_maskz_loadu_ps(ch.inside[j], b + 16 * j)) : v;
}

// Every chunk of a span's row, act(bias (or 0) + the tile's row ci in its kept columns), handed
// to put(j, chunk). An activation runs in a second pass, over the row expanded into buf
// (ch.count * 16 floats, 64-byte aligned): on Zen 5 an expand-load with GELU's long chain of
// dependent FMAs after it in the same loop ran 5.7x slower than the two passes (BUILD_NOTES.md,
// "GELU after the expand"). Without one, one pass (two measured slower there).
template <class Put>
inline void ExpandChunks(const SpanChunks& ch, const float* ci, const float* b, Activation act, float* buf,
                         Put put) {
  if (act == Activation::kNone) {
    for (int64_t j = 0; j < ch.count; ++j) put(j, ExpandChunk(ch, ci, b, j));
    return;
  }
  for (int64_t j = 0; j < ch.count; ++j) _mm512_store_ps(buf + 16 * j, ExpandChunk(ch, ci, b, j));
  for (int64_t j = 0; j < ch.count; ++j) put(j, (__m512)Activate((vf)_mm512_load_ps(buf + 16 * j), act));
}

// y_row[0, len) = act(bias[0, len) (or 0) + the tile's row ci in its kept columns (SpanChunks)).
// With chunks made for y_row's phase, base is y_row's 64-byte line, as `stream` needs; a buffer
// row (phase 0, no stream) need not be aligned. buf: as ExpandChunks (unused without act).
inline void ExpandRow(const SpanChunks& ch, const float* ci, const float* bias, float* y_row, bool stream,
                      Activation act, float* buf) {
  float* base = y_row - ch.phase;
  ExpandChunks(ch, ci, bias ? bias - ch.phase : nullptr, act, buf, [&](int64_t j, __m512 v) {
    if (stream && ch.inside[j] == 0xffff) _mm512_stream_ps(base + 16 * j, v);
    else _mm512_mask_storeu_ps(base + 16 * j, ch.inside[j], v);
  });
}

// The same for a bf16 y (chunks made with phase 0: chunk j is columns [16 j, 16 j + 16)).
inline void ExpandRowBF16(const SpanChunks& ch, const float* ci, const float* bias, uint16_t* y_row, int64_t len,
                          Activation act, float* buf) {
  ExpandChunks(ch, ci, bias, act, buf, [&](int64_t j, __m512 v) {
    StoreBF16(y_row + 16 * j, v, std::min<int64_t>(16, len - 16 * j));
  });
}
#endif

// Every buffer of a thread's work items, reused across calls: one thread_local object, looked up
// once per work item (ThreadScratch) and handed down. In a shared library each use of a
// thread_local is a call to __tls_get_addr, which glibc before 2.39 sends down its slow path in
// every module once another was dlopen'ed: 18 look-ups per item took 4.5% of the samples of a
// 384 x 384 layer at M = 4096 (BUILD_NOTES.md).
struct Scratch {
  AlignedBuffer span, panels, c, xt, accs, few_weights;        // Epilogue, Rows, Few
  AlignedBuffer pair_x2, pair_xt, pair_b, pair_ct, pair_c, pair_zeros;  // RowsPairs
  std::vector<float> residue_values;                           // Residue (bf16)
  std::vector<int64_t> pair_woff;
#if defined(TW_ISA_AVX512)
  SpanChunks chunks;
#endif
};

// Not inlined: inlined, GCC may see that every caller passes this thread_local down and look it
// up again at each use.
__attribute__((noinline)) Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Span t's residue weights are [ResidueStart(p, t), ResidueStart(p, t + 1)): the first weight
// in a column from span t's lo on, found by bisection. Whatever the indices hold, the starts are
// in [0, e], the first is 0 and the last e, and span t's end is span t + 1's start: the spans'
// ranges cover every weight once if each starts no later than it ends (PackedTilesView::
// ResidueHolds).
int64_t ResidueStart(const PackedTilesView& p, int64_t t) {
  if (t <= 0 || p.e == 0) return 0;
  if (t >= Spans(p)) return p.e;
  int64_t lo, hi;
  Span(p, t, &lo, &hi);
  // The first of [0, e) whose column is not below lo: std::lower_bound's loop, written out
  // because lower_bound requires a sorted range and these indices are not checked yet.
  int64_t first = 0, count = p.e;
  while (count > 0) {
    const int64_t half = count / 2;
    if (p.residue_cols[first + half] < lo) {
      first += half + 1;
      count -= half + 1;
    } else {
      count = half;
    }
  }
  return first;
}

// Whether span t's residue weights [e0, e1) may be read (ResidueChecks, tw_kernel.h): checked by
// PackedTilesView::ResidueHolds unless an item for other rows of the span already found them
// sound. With the spans partitioning both the columns and the weights (ResidueStart), every
// span's holding is the whole residue's.
bool ResidueSound(const TileGemmArgs& args, int64_t t, int64_t lo, int64_t hi, int64_t e0, int64_t e1) {
  std::atomic<bool>& sound = args.residue_checks->sound[t];
  if (sound.load(std::memory_order_acquire)) return true;
  if (!args.p->ResidueHolds(e0, e1, lo, hi)) {
    args.residue_checks->corrupt.store(true, std::memory_order_relaxed);
    return false;
  }
  sound.store(true, std::memory_order_release);
  return true;
}

// The epilogue of span t for rows [m0, m0 + rows): y = activation(bias (or 0) + c (the tile's
// result, rows x ldc, in the tile's kept columns) + residue), in y's dtype. c is unused without a tile.
// Each row of the span is made in a buffer (one row in L1; every row of the span when the
// residue has to be added first), then written to y whole, once.
void Epilogue(const TileGemmArgs& args, int64_t t, int64_t m0, int64_t rows, const float* c,
              int64_t ldc, const PanelRows& x, Scratch& scratch) {
  AlignedBuffer& span_scratch = scratch.span;
  const PackedTilesView& p = *args.p;
  int64_t lo, hi;
  Span(p, t, &lo, &hi);
  const int64_t len = hi - lo;
  const int64_t e0 = ResidueStart(p, t), e1 = ResidueStart(p, t + 1);
  // Unsound weights (ResidueSound; Residue's false) are not read and fail the call.
  const bool residue = e0 != e1 && (ChecksAsItWalks(args, x, rows) || ResidueSound(args, t, lo, hi, e0, e1));
  const int64_t width = t < p.t && c != nullptr ? p.width(t) : 0;
  const int32_t* out = width > 0 ? p.columns + t * p.g : nullptr;
  const float* bias = args.bias ? args.bias + lo : nullptr;
#if defined(TW_ISA_AVX512)
  SpanChunks& chunks = scratch.chunks;
  chunks.phase = -1;
#endif
  // Row i of the span into a buffer: bias (or zero), then the tile's result (stores only: a
  // read-modify-write of the row just filled stalls on store forwarding).
  auto make = [&](float* si, int64_t i) {
#if defined(TW_ISA_AVX512)
    if (width > 0) {  // masked expand-loads of the tile's row (SpanChunks, phase 0), no scatter
      if (chunks.phase != 0) chunks.Make(0, len, out, width, lo);
      ExpandRow(chunks, c + i * ldc, bias, si, false, Activation::kNone, nullptr);
      return;
    }
#endif
    if (bias) std::memcpy(si, bias, len * sizeof(float));
    else std::memset(si, 0, len * sizeof(float));
    const float* ci = width > 0 ? c + i * ldc : nullptr;
    if (bias) {
      for (int64_t j = 0; j < width; ++j) si[out[j] - lo] = ci[j] + bias[out[j] - lo];
    } else {
      for (int64_t j = 0; j < width; ++j) si[out[j] - lo] = ci[j];
    }
  };
  auto store = [&](float* si, int64_t i) {
    ActivateRow(si, len, args.activation);
    if (args.y_bf16) {
      uint16_t* yi = static_cast<uint16_t*>(args.y) + (m0 + i) * p.n + lo;
      int64_t j = 0;
#if defined(TW_ISA_AVX512)
      for (; j < len; j += 16) StoreBF16(yi + j, _mm512_loadu_ps(si + j), std::min<int64_t>(16, len - j));
#endif
      for (; j < len; ++j) yi[j] = ToBF16(si[j]);
    } else {
      StoreRow(static_cast<float*>(args.y) + (m0 + i) * p.n + lo, si, len, args.stream);
    }
  };
  if (residue) {  // every row of the span in the buffer, the residue added, then written
    float* s = span_scratch.Get(rows * len);
    for (int64_t i = 0; i < rows; ++i) make(s + i * len, i);
    if (!Residue(args, x, rows, e0, e1, lo, hi, s, len, scratch.residue_values))
      args.residue_checks->corrupt.store(true, std::memory_order_relaxed);
    for (int64_t i = 0; i < rows; ++i) store(s + i * len, i);
#if defined(TW_ISA_AVX512)
  } else if (c != nullptr && args.y_bf16) {  // straight from the tile's rows (SpanChunks)
    if (chunks.phase != 0) chunks.Make(0, len, out, width, lo);
    const bool act = args.activation != Activation::kNone;  // (ExpandChunks' buffer)
    float* buf = act ? span_scratch.Get(chunks.count * 16) : nullptr;
    for (int64_t i = 0; i < rows; ++i)
      ExpandRowBF16(chunks, c + i * ldc, bias, static_cast<uint16_t*>(args.y) + (m0 + i) * p.n + lo, len,
                    args.activation, buf);
  } else if (c != nullptr) {
    const bool act = args.activation != Activation::kNone;  // (ExpandChunks' buffer)
    float* buf = act ? span_scratch.Get((len + 30) / 16 * 16) : nullptr;  // chunks of any phase
    for (int64_t i = 0; i < rows; ++i) {
      float* yi = static_cast<float*>(args.y) + (m0 + i) * p.n + lo;
      const int64_t phase = static_cast<int64_t>(reinterpret_cast<uintptr_t>(yi) % 64 / sizeof(float));
      if (phase != chunks.phase) chunks.Make(phase, len, out, width, lo);
      ExpandRow(chunks, c + i * ldc, bias, yi, args.stream, args.activation, buf);
    }
#endif
  } else {  // one row at a time through an L1 buffer
    float* s = span_scratch.Get(len);
    for (int64_t i = 0; i < rows; ++i) {
      make(s, i);
      store(s, i);
    }
  }
#if defined(TW_ISA_AVX512) || defined(TW_ISA_AVX2)
  if (args.stream) _mm_sfence();
#endif
}

// Rows [m_begin, m_end) of y: pack those rows of x (or transpose them, for a residue), then per
// tile its GEMM and its span. Deep layers (K > kKBlock) go in K blocks of at most kKBlock, so
// that the item's panels stay in L2: each block's columns of x are packed, then every tile's kept rows inside the block are
// added to that tile's results (one buffer per tile), and the spans are written after the last.
void Rows(const TileGemmArgs& args, int64_t m_begin, int64_t m_end, int64_t t_begin, int64_t t_end) {
  Scratch& scratch = ThreadScratch();
  AlignedBuffer &panel_scratch = scratch.panels, &cscratch = scratch.c;
  const PackedTilesView& p = *args.p;
  const int64_t rows = m_end - m_begin;
  const int64_t npanels = (rows + MR - 1) / MR;
  int64_t nblocks, kbw;
  KBlocks(p.k, &nblocks, &kbw);
  // The residue reads the rows feature-major (bf16 x maybe as bf16: Bf16Rows).
  const int64_t ldxt = (npanels * MR + VL - 1) / VL * VL;
  float* xt;
  uint16_t* xt16;
  ResidueRows(scratch.xt, p, args.bf16, rows, ldxt, &xt, &xt16);
  const PanelRows xs{xt, ldxt, xt16};
  // The tiles' x panels: packed, or read in place (InPlace), or with f32 rows made for the
  // residue, read there: each K index's MR values of a panel's rows are consecutive in xt, as in
  // a packed panel, ldxt floats apart instead of MR, and rows past M are zero (TransposeRows).
  // That is one line per kept K index (in place: MR) and no packing: TEW 75% + 5% and + 12.5%
  // (M = 256 and 2048) ran 0-3% faster, about the spread of the runs, the same sums bit for bit
  // (BUILD_NOTES.md, "Tiles read the residue's rows").
  float* panels = xt ? nullptr : panel_scratch.Get(npanels * kbw * MR);
  // Tile results: one buffer reused tile after tile, or with K blocks one per tile.
  int64_t cfloats = 0;
  for (int64_t tile = t_begin; tile < std::min(t_end, p.t); ++tile)
    cfloats = nblocks > 1 ? cfloats + PaddedWidth(p, tile) : std::max(cfloats, PaddedWidth(p, tile));
  float* cbuf = cscratch.Get(npanels * MR * cfloats);
  const bool wip = WeightsInPlace(args);  // weights read in place: rows g floats apart
  const int64_t ldb = wip ? p.g : NR;
  for (int64_t kb = 0; kb < p.k; kb += kbw) {
    const int64_t kw = std::min(kbw, p.k - kb);
    const bool last = kb + kw == p.k;
    if (!xt) Pack(args, panels, m_begin, npanels, kb, kw);
    if (xt || xt16) {
      const int64_t first = m_begin * p.k + kb, at = kb * ldxt;  // x's row m_begin, column kb
      if (!args.bf16) TransposeRows(static_cast<const float*>(args.x) + first, p.k, rows, kw, xt + at, ldxt);
      else if (xt16) TransposeRows(static_cast<const uint16_t*>(args.x) + first, p.k, rows, kw, xt16 + at, ldxt);
      else TransposeRows(static_cast<const uint16_t*>(args.x) + first, p.k, rows, kw, xt + at, ldxt);
    }
    float* c = cbuf;
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int64_t depth = tile < p.t ? p.depth(tile) : 0, gp = tile < p.t ? PaddedWidth(p, tile) : 0;
      if (depth > 0) {
        const int32_t* kept = p.rows + p.row_offsets[tile];
        // This block's kept rows: [q0, q1) of the tile's (ascending: Validate).
        int64_t q0, q1;
        BlockRows(kept, depth, kb, kw, &q0, &q1);
        // Micro-panel jp's row q: in the packed values, or in the per-call copy (PackWeights).
        const float* bbuf = wip ? static_cast<const float*>(args.values) + p.row_offsets[tile] * p.g
                                : args.weights + args.weight_offsets[tile];
        for (int64_t k0 = q0; k0 < q1; k0 += KC) {
          const int64_t kc = std::min(KC, q1 - k0);
          for (int64_t jp = 0; jp < gp; jp += NR) {
            const float* b = bbuf + (wip ? jp : (jp / NR) * depth * NR) + k0 * ldb;
            for (int64_t ip = 0; ip < npanels; ++ip) {
              float* cp = c + ip * MR * gp + jp;
              if (xt)
                Micro<false>(kc, xt + ip * MR, ldxt, kept + k0, b, ldb, cp, gp, k0 > 0);
              else if (InPlace(args, m_begin, ip))
                Micro<true>(kc, static_cast<const float*>(args.x) + (m_begin + ip * MR) * p.k, p.k, kept + k0, b,
                            ldb, cp, gp, k0 > 0);
              else  // the panel as if it started at column 0
                Micro<false>(kc, panels + (ip * kw - kb) * MR, MR, kept + k0, b, ldb, cp, gp, k0 > 0);
            }
          }
        }
      }
      // After the tile's last kept row, its span (no tile, or one with no kept rows: bias and
      // residue only).
      if (last) Epilogue(args, tile, m_begin, rows, depth > 0 ? c : nullptr, gp, xs, scratch);
      if (nblocks > 1) c += npanels * MR * gp;
    }
  }
}

// FewMicroTable<T, WT, W>(0..n-1)[r - 1]: Micro<true, r, T, WT, W>, for the few-rows path's r
// rows of x in place, W vectors wide.
template <class T, class WT>
using FewMicroFn = decltype(&Micro<true, 1, T, WT>);
template <class T, class WT, int W, int... R>
constexpr std::array<FewMicroFn<T, WT>, sizeof...(R)> FewMicroTable(std::integer_sequence<int, R...>) {
  return {&Micro<true, R + 1, T, WT, W>...};
}
template <class T, class WT>
constexpr auto kFewMicro = FewMicroTable<T, WT, NV>(std::make_integer_sequence<int, MR>{});

// Up to kWideRows rows of x with the weights in place, the tile's columns go in strips of
// kWide vectors (AVX-512: 128 f32 columns; AVX2: 64) instead of NR: each kept row's weights are
// then read 8 vectors at a time, not NV of each row in turn, one micro-panel after another.
// With the weights in memory (a model's layers, each read once per step) one row ran 1.15-2.16x
// faster; with them in the caches 0.92-1.04x at one row, 1.04-1.19x at 2-8 rows (BUILD_NOTES.md,
// "Weights from memory").
constexpr int kWide = 8;
constexpr int kWideRows = VL == 16 ? 3 : VL == 8 ? 1 : 0;
template <class T, class WT>
constexpr auto kWideMicro = FewMicroTable<T, WT, kWide>(std::make_integer_sequence<int, kWideRows>{});

// The tile's blocks of up to MR rows (x's rows [m_begin, m_begin + rows), T) and NR columns
// into acc (rows x gp): micro-panel j's row q at w + j * stride + q * ldb. In the packed values
// (in_place) ldb = g and stride = NR, and up to kWideRows rows go in wider strips; in a copy
// (PackWeights) ldb = NR and stride = depth * NR.
template <class T, class WT>
void FewBlocks(const TileGemmArgs& args, int64_t m_begin, int64_t rows, int64_t tile, const WT* w, int64_t ldb,
               int64_t stride, bool in_place, float* acc, int64_t gp) {
  const PackedTilesView& p = *args.p;
  const int64_t depth = p.depth(tile), width = p.width(tile);
  const int32_t* kept = p.rows + p.row_offsets[tile];
  for (int64_t i0 = 0; i0 < rows; i0 += MR) {
    const int64_t r = std::min<int64_t>(MR, rows - i0);
    const T* a = static_cast<const T*>(args.x) + (m_begin + i0) * p.k;
    int64_t jp = 0;
    if constexpr (kWideRows > 0) {
      if (in_place && r <= kWideRows) {
        for (; jp + kWide * VL <= gp; jp += kWide * VL)
          kWideMicro<T, WT>[r - 1](depth, a, p.k, kept, w + jp, ldb, acc + i0 * gp + jp, gp, false);
      }
    }
    for (; jp < width; jp += NR)
      kFewMicro<T, WT>[r - 1](depth, a, p.k, kept, w + (jp / NR) * stride, ldb, acc + i0 * gp + jp, gp, false);
  }
}

// Few rows (M <= kSmallRows): no packing of x. The tile's weights are read in place from the
// packed values when G is a multiple of NR (f32; bf16 widened as they are loaded, when the item
// has at most MR rows: more would widen them once per block of rows), else copied once per item
// into f32 micro-panels (PackWeights); each block of up to MR rows and NR columns sums over the
// kept rows in registers (Micro), reading x's rows in place. (Summing into a row buffer in L1
// instead, a load and a store per FMA, was 1.4-2.2x slower at M = 8-32 on a CPU that stores one
// vector per cycle. Widening bf16 x into f32 first, once per call or once per item, ran at
// 0.75-1.06x and 0.94-1.04x the speed of this at M = 16-32: BUILD_NOTES.md.)
void Few(const TileGemmArgs& args, int64_t tile, int64_t m_begin, int64_t m_end) {
  Scratch& scratch = ThreadScratch();
  const PackedTilesView& p = *args.p;
  const int64_t rows = m_end - m_begin;
  const PanelRows xt{args.xt ? args.xt + m_begin : nullptr, args.ldxt};
  const int64_t depth = tile < p.t ? p.depth(tile) : 0;
  if (depth == 0) {
    Epilogue(args, tile, m_begin, rows, nullptr, 0, xt, scratch);
    return;
  }
  const int64_t gp = PaddedWidth(p, tile);
  float* acc = scratch.accs.Get(rows * gp);
  if (p.g % NR == 0 && (!args.bf16 || rows <= MR)) {  // in place
    const int64_t at = p.row_offsets[tile] * p.g;
    if (args.bf16)
      FewBlocks<uint16_t>(args, m_begin, rows, tile, static_cast<const uint16_t*>(args.values) + at, p.g, NR, true,
                          acc, gp);
    else
      FewBlocks<float>(args, m_begin, rows, tile, static_cast<const float*>(args.values) + at, p.g, NR, true, acc,
                       gp);
  } else {
    float* panels = scratch.few_weights.Get(gp * depth);
    PackWeights(args, tile, panels);
    if (args.bf16) FewBlocks<uint16_t>(args, m_begin, rows, tile, panels, NR, depth * NR, false, acc, gp);
    else FewBlocks<float>(args, m_begin, rows, tile, panels, NR, depth * NR, false, acc, gp);
  }
  Epilogue(args, tile, m_begin, rows, acc, gp, xt, scratch);
}


#if defined(TW_PAIRS)
// ---------------------------------------------------------------------------------------------
// bf16 on AMX (compiled into the "avx512-amx" variant; chosen when the CPU has AMX-BF16 and the
// OS grants the tile data: tw_cpu.cc) or by AVX512-BF16's VDPBF16PS (the "avx512-bf16" variant,
// CPUs with AVX512-BF16 but no AMX). Each tile's GEMM is run transposed, y^T = W^T x^T, on
// f32 C^T[j][i] (output column j, row i of the work item): on AMX by TDPBF16PS on 16 x 16 tiles;
// by VDPBF16PS 8 columns x 48 rows at a time (TileProductsDp), from the same operands:
//  - A = W^T: 16 output columns x 32 kept K indices, bf16. The tile's weights in this layout
//    (per K block, per 16 columns, per step of 32 kept rows: 1 KB) are made once per call, like
//    the f32 micro-panels (PackWeightsPairs; step 1 in tw_kernel.h).
//  - B = x^T in pairs: row p of a step holds, for 16 rows i of x, x[i][kept[2p]] and
//    x[i][kept[2p + 1]] (the layout TDPBF16PS contracts in pairs). The work item's rows of x are
//    transposed once per K block in 32-bit pairs of consecutive K indices (TransposePairs), so
//    each such row is one word permute of two rows of that (BuildPairs).
// The f32 C^T tiles are transposed into the tile's rows once the last K block is done, and the
// same epilogue as f32 writes the span. TDPBF16PS and VDPBF16PS multiply bf16 exactly and add in
// f32, but treat denormal inputs as zero and flush denormal results: bf16 values of x or W below
// 1.2e-38 in magnitude count as zero here, unlike in the avx512 variant.

constexpr int64_t kSteps = 32;  // kept K indices per TDPBF16PS (16 pairs)

inline int64_t ColumnGroups(const PackedTilesView& p, int64_t tile) { return (p.width(tile) + 15) / 16; }

// Floats of a tile's A operands: per K block, ColumnGroups x steps x 1 KB.
int64_t WeightSizePairs(const PackedTilesView& p, int64_t tile) {
  int64_t nblocks, kbw, steps = 0;
  KBlocks(p.k, &nblocks, &kbw);
  const int32_t* kept = p.rows + p.row_offsets[tile];
  for (int64_t kb = 0; kb < p.k; kb += kbw) {
    int64_t q0, q1;
    BlockRows(kept, p.depth(tile), kb, std::min(kbw, p.k - kb), &q0, &q1);
    steps += (q1 - q0 + kSteps - 1) / kSteps;
  }
  return steps * ColumnGroups(p, tile) * 256;
}

// w[block][jc][s][j][kk] = W^T: the bf16 weight of the tile's column 16 jc + j at its kept row
// q0 + 32 s + kk of the block, zero past the tile's width and the block's kept rows. Each 1 KB
// is one 16 x 16 transpose of 32-bit pairs (rows q and q + 1 of 16 columns).
void PackWeightsPairs(const TileGemmArgs& args, int64_t tile, float* b) {
  const PackedTilesView& p = *args.p;
  const uint16_t* values = static_cast<const uint16_t*>(args.values);
  const int64_t width = p.width(tile), ncg = ColumnGroups(p, tile), offset = p.row_offsets[tile];
  int64_t nblocks, kbw;
  KBlocks(p.k, &nblocks, &kbw);
  float* w = b;
  for (int64_t kb = 0; kb < p.k; kb += kbw) {
    int64_t q0, q1;
    BlockRows(p.rows + offset, p.depth(tile), kb, std::min(kbw, p.k - kb), &q0, &q1);
    const int64_t steps = (q1 - q0 + kSteps - 1) / kSteps;
    for (int64_t jc = 0; jc < ncg; ++jc) {
      const __mmask16 cols = static_cast<__mmask16>((1u << std::min<int64_t>(16, width - 16 * jc)) - 1);
      auto row = [&](int64_t q) {  // the 16 columns' weights at kept row q, one per 32-bit lane
        if (q >= q1) return _mm512_setzero_si512();
        return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, values + (offset + q) * p.g + 16 * jc));
      };
      for (int64_t s = 0; s < steps; ++s, w += 256) {
        __m512 r[16];
        for (int pp = 0; pp < 16; ++pp) {
          const int64_t q = q0 + s * kSteps + 2 * pp;
          r[pp] = _mm512_castsi512_ps(_mm512_or_si512(row(q), _mm512_slli_epi32(row(q + 1), 16)));
        }
        Transpose16x16(r);  // r[j] lane pp: column j's pair pp
        for (int j = 0; j < 16; ++j) _mm512_store_ps(w + 16 * j, r[j]);
      }
    }
  }
}

// x2[j][i] = x[m0 + i][kb + 2j] | x[m0 + i][kb + 2j + 1] << 16 (bf16 bits) for j < ceil(kw / 2)
// and i < ldx2 (zero past `rows` and past the block): the work item's rows of x transposed in
// 32-bit pairs of consecutive K indices, by 16 x 16 register transposes.
void TransposePairs(const TileGemmArgs& args, int64_t m0, int64_t rows, int64_t kb, int64_t kw, uint32_t* x2,
                    int64_t ldx2) {
  const uint16_t* x = static_cast<const uint16_t*>(args.x) + m0 * args.p->k + kb;
  const int64_t ld = args.p->k, npairs = (kw + 1) / 2;
  for (int64_t i0 = 0; i0 < ldx2; i0 += 16)
    for (int64_t j0 = 0; j0 < npairs; j0 += 16) {
      const int64_t left = std::min<int64_t>(32, kw - 2 * j0);  // bf16 values in this block's row
      const __mmask32 mask = left == 32 ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i0 + i < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, x + (i0 + i) * ld + 2 * j0))
                             : _mm512_setzero_ps();
      Transpose16x16(r);
      const int64_t w = std::min<int64_t>(16, npairs - j0);
      for (int64_t j = 0; j < w; ++j) _mm512_store_ps(reinterpret_cast<float*>(x2 + (j0 + j) * ldx2 + i0), r[j]);
    }
}

// xt[q][i] = x[m0 + i][kb + q] (the residue's layout) from the pairs of TransposePairs: as f32
// (PanelRows::xt), or as bf16 bits (O = uint16_t, PanelRows::xt16).
template <class O>
void UnpairRows(const uint32_t* x2, int64_t ldx2, int64_t kw, O* xt) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t q = 0; q < kw; ++q) {
    const uint32_t* row = x2 + (q / 2) * ldx2;
    O* out = xt + q * ldx2;
    for (int64_t i = 0; i < ldx2; i += 16) {
      const __m512i v = _mm512_load_si512(row + i);
      if constexpr (std::is_same<O, float>::value) {
        _mm512_store_si512(out + i, q % 2 ? _mm512_and_si512(v, high) : _mm512_slli_epi32(v, 16));
      } else {
        const __m256i h = _mm512_cvtepi32_epi16(q % 2 ? _mm512_srli_epi32(v, 16) : v);
        _mm256_store_si256(reinterpret_cast<__m256i*>(out + i), h);
      }
    }
  }
}

// B operands of the tile's steps in this block: b[(s * ngroups + gi) * 256 + pp * 16 + i] =
// (x[16 gi + i][kept[q]], x[16 gi + i][kept[q + 1]]) as a bf16 pair, q = q0 + 32 s + 2 pp
// (zero past q1): one two-source word permute of the rows of x2 that hold them.
void BuildPairs(const uint32_t* x2, int64_t ldx2, int64_t kb, const int32_t* kept, int64_t q0, int64_t q1,
                const uint32_t* zeros, uint32_t* b) {
  const int64_t ngroups = ldx2 / 16, steps = (q1 - q0 + kSteps - 1) / kSteps;
  // pick[ha][hb]: word 2i of the result is word 2i + ha of the first source, word 2i + 1 word
  // 2i + hb of the second.
  alignas(64) static const auto pick = [] {
    std::array<std::array<std::array<uint16_t, 32>, 2>, 2> t{};
    for (int ha = 0; ha < 2; ++ha)
      for (int hb = 0; hb < 2; ++hb)
        for (int i = 0; i < 16; ++i) {
          t[ha][hb][2 * i] = static_cast<uint16_t>(2 * i + ha);
          t[ha][hb][2 * i + 1] = static_cast<uint16_t>(32 + 2 * i + hb);
        }
    return t;
  }();
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t pp = 0; pp < 16; ++pp) {
      const int64_t q = q0 + s * kSteps + 2 * pp;
      const int64_t ka = q < q1 ? kept[q] - kb : -1, kc = q + 1 < q1 ? kept[q + 1] - kb : -1;
      const uint32_t* ra = ka >= 0 ? x2 + (ka / 2) * ldx2 : zeros;
      const uint32_t* rb = kc >= 0 ? x2 + (kc / 2) * ldx2 : zeros;
      const __m512i idx = _mm512_load_si512(pick[ka < 0 ? 0 : ka % 2][kc < 0 ? 0 : kc % 2].data());
      uint32_t* out = b + s * ngroups * 256 + pp * 16;
      for (int64_t gi = 0; gi < ngroups; ++gi)
        _mm512_store_si512(out + gi * 256, _mm512_permutex2var_epi16(_mm512_load_si512(ra + 16 * gi), idx,
                                                                     _mm512_load_si512(rb + 16 * gi)));
    }
}

#if defined(TW_AMX)
// C^T (+)= A B over `steps` steps for every 16 x 16 block of the tile: ct[j][i], ldt floats per
// output column. 2 x 2 blocks at a time (tiles 0-3), A in tiles 4-5, B in 6-7.
void TileProducts(const uint16_t* w, int64_t ncg, int64_t steps, const uint32_t* b, int64_t ngroups,
                  float* ct, int64_t ldt, bool accumulate) {
  const int64_t stride = ldt * sizeof(float);
  for (int64_t jc = 0; jc < ncg; jc += 2) {
    const bool two = jc + 1 < ncg;
    const uint16_t* w0 = w + jc * steps * 512;
    const uint16_t* w1 = w0 + steps * 512;
    for (int64_t gi = 0; gi < ngroups; gi += 2) {
      float* c00 = ct + 16 * jc * ldt + 16 * gi;
      float* c10 = c00 + 16 * ldt;
      if (accumulate) {
        _tile_loadd(0, c00, stride);
        _tile_loadd(1, c00 + 16, stride);
        if (two) {
          _tile_loadd(2, c10, stride);
          _tile_loadd(3, c10 + 16, stride);
        }
      } else {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
          _tile_zero(2);
          _tile_zero(3);
        }
      }
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(4, w0 + s * 512, 64);
        _tile_loadd(6, b + (s * ngroups + gi) * 256, 64);
        _tile_loadd(7, b + (s * ngroups + gi + 1) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (two) {
          _tile_loadd(5, w1 + s * 512, 64);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c00, stride);
      _tile_stored(1, c00 + 16, stride);
      if (two) {
        _tile_stored(2, c10, stride);
        _tile_stored(3, c10 + 16, stride);
      }
    }
  }
}

#else
// C^T (+)= A B as TileProducts, by VDPBF16PS: for 8 columns j and V vectors of 16 rows, over the
// first npairs pairs of kept K indices (not the zero pairs that pad the last step), each pair
// one vector of x's pairs (16 rows) and one weight pair per column, broadcast: 8V sums in
// registers, 8 + V loads per 8V instructions.
template <int V>
void DpBlock(const uint32_t* w, int64_t steps, int64_t npairs, const uint32_t* b, int64_t ngroups, float* ct,
             int64_t ldt, bool accumulate) {
  __m512 acc[8][V];
  for (int j = 0; j < 8; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = accumulate ? _mm512_load_ps(ct + j * ldt + 16 * v) : _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const uint32_t* ws = w + s * 256;  // [j][pp]: column j's pair pp of step s
    const uint32_t* bs = b + s * ngroups * 256;
    const int64_t np = std::min<int64_t>(16, npairs - 16 * s);
    for (int64_t pp = 0; pp < np; ++pp) {
      __m512bh xv[V];
      for (int v = 0; v < V; ++v) xv[v] = (__m512bh)_mm512_load_si512(bs + v * 256 + pp * 16);
      for (int j = 0; j < 8; ++j) {
        const __m512bh wj = (__m512bh)_mm512_set1_epi32(static_cast<int>(ws[j * 16 + pp]));
        for (int v = 0; v < V; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], xv[v], wj);
      }
    }
  }
  for (int j = 0; j < 8; ++j)
    for (int v = 0; v < V; ++v) _mm512_store_ps(ct + j * ldt + 16 * v, acc[j][v]);
}

void TileProductsDp(const uint16_t* w, int64_t ncg, int64_t steps, int64_t npairs, const uint32_t* b,
                    int64_t ngroups, float* ct, int64_t ldt, bool accumulate) {
  const uint32_t* w32 = reinterpret_cast<const uint32_t*>(w);
  for (int64_t jc = 0; jc < ncg; ++jc)
    for (int64_t j0 = 0; j0 < 16; j0 += 8) {
      const uint32_t* wj = w32 + jc * steps * 256 + j0 * 16;
      float* cj = ct + (16 * jc + j0) * ldt;
      for (int64_t gi = 0; gi < ngroups; gi += 3) {
        const int64_t v = std::min<int64_t>(3, ngroups - gi);
        (v == 3 ? DpBlock<3> : v == 2 ? DpBlock<2> : DpBlock<1>)(wj, steps, npairs, b + gi * 256, ngroups,
                                                                 cj + 16 * gi, ldt, accumulate);
      }
    }
}
#endif

// c[i][j] = ct[j][i] for the tile's ldt rows and 16 ncg columns (c: 16 ncg floats per row).
void ColumnsToRows(const float* ct, int64_t ldt, int64_t ncg, float* c) {
  const int64_t ldc = 16 * ncg;
  for (int64_t jc = 0; jc < ncg; ++jc)
    for (int64_t i0 = 0; i0 < ldt; i0 += 16) {
      __m512 r[16];
      for (int j = 0; j < 16; ++j) r[j] = _mm512_load_ps(ct + (16 * jc + j) * ldt + i0);
      Transpose16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_store_ps(c + (i0 + i) * ldc + 16 * jc, r[i]);
    }
}

#if defined(TW_AMX)
// Loads the tile configuration for this thread, and releases the tile state however the scope
// ends (Epilogue may throw: an exception must not leave a pool thread with live tiles).
struct TileScope {
  explicit TileScope(const void* config) { _tile_loadconfig(config); }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// Palette 1, tiles 0-7 all 16 rows x 64 bytes.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int i = 0; i < 8; ++i) {
      colsb[i] = 64;
      rows[i] = 16;
    }
  }
};
#endif

// Rows [m_begin, m_end) of y, spans [t_begin, t_end), bf16 x in pairs: as Rows, K block by K
// block (each tile's C^T kept between blocks), the rows of x transposed instead of packed.
void RowsPairs(const TileGemmArgs& args, int64_t m_begin, int64_t m_end, int64_t t_begin, int64_t t_end) {
  Scratch& scratch = ThreadScratch();
  AlignedBuffer &x2_scratch = scratch.pair_x2, &xt_scratch = scratch.pair_xt, &pair_scratch = scratch.pair_b,
                &ct_scratch = scratch.pair_ct, &c_scratch = scratch.pair_c, &zero_scratch = scratch.pair_zeros;
  std::vector<int64_t>& woff = scratch.pair_woff;
#if defined(TW_AMX)
  static const TileConfig config;
#endif
  const PackedTilesView& p = *args.p;
  const int64_t rows = m_end - m_begin, ldt = (rows + 31) / 32 * 32, ngroups = ldt / 16;
  int64_t nblocks, kbw;
  KBlocks(p.k, &nblocks, &kbw);
  // x in pairs of K indices, a block at a time; with a residue also feature-major, the whole of
  // K (the residue reads it after the last block), as bf16 or f32 (Bf16Rows).
  uint32_t* x2 = reinterpret_cast<uint32_t*>(x2_scratch.Get((kbw + 1) / 2 * ldt));
  float* xt;
  uint16_t* xt16;
  ResidueRows(xt_scratch, p, true, rows, ldt, &xt, &xt16);
  uint32_t* zeros = reinterpret_cast<uint32_t*>(zero_scratch.Get(ldt));
  std::fill(zeros, zeros + ldt, 0u);
  const int64_t tiles_end = std::min(t_end, p.t);
  int64_t ctfloats = 0, maxsteps = 0;
  woff.assign(std::max<int64_t>(tiles_end - t_begin, 0), 0);
  for (int64_t tile = t_begin; tile < tiles_end; ++tile) {
    const int64_t cf = ColumnGroups(p, tile) * 16 * ldt;
    ctfloats = nblocks > 1 ? ctfloats + cf : std::max(ctfloats, cf);
    maxsteps = std::max(maxsteps, (std::min(p.depth(tile), kbw) + kSteps - 1) / kSteps + 1);
  }
  float* ctbuf = ct_scratch.Get(ctfloats);
  uint32_t* pairs = reinterpret_cast<uint32_t*>(pair_scratch.Get(maxsteps * ngroups * 256));
  float* c = nullptr;
#if defined(TW_AMX)
  const TileScope tiles(&config);
#endif
  for (int64_t kb = 0; kb < p.k; kb += kbw) {
    const int64_t kw = std::min(kbw, p.k - kb);
    const bool last = kb + kw == p.k;
    TransposePairs(args, m_begin, rows, kb, kw, x2, ldt);
    if (xt) UnpairRows(x2, ldt, kw, xt + kb * ldt);
    if (xt16) UnpairRows(x2, ldt, kw, xt16 + kb * ldt);
    float* ct = ctbuf;
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int64_t depth = tile < p.t ? p.depth(tile) : 0, ncg = tile < p.t ? ColumnGroups(p, tile) : 0;
      if (depth > 0) {
        const int32_t* kept = p.rows + p.row_offsets[tile];
        int64_t q0, q1;
        BlockRows(kept, depth, kb, kw, &q0, &q1);
        const int64_t steps = (q1 - q0 + kSteps - 1) / kSteps;
        const uint16_t* w = reinterpret_cast<const uint16_t*>(args.weights + args.weight_offsets[tile]) +
                            woff[tile - t_begin];
        woff[tile - t_begin] += steps * ncg * 512;
        BuildPairs(x2, ldt, kb, kept, q0, q1, zeros, pairs);
#if defined(TW_AMX)
        TileProducts(w, ncg, steps, pairs, ngroups, ct, ldt, kb > 0);
#else
        TileProductsDp(w, ncg, steps, (q1 - q0 + 1) / 2, pairs, ngroups, ct, ldt, kb > 0);
#endif
        if (last) {
          c = c_scratch.Get(ldt * 16 * ncg);
          ColumnsToRows(ct, ldt, ncg, c);
        }
      }
      if (last)
        Epilogue(args, tile, m_begin, rows, depth > 0 ? c : nullptr, 16 * ncg, PanelRows{xt, ldt, xt16}, scratch);
      if (nblocks > 1) ct += ncg * 16 * ldt;
    }
  }
}

// The variant's entry points: bf16 in pairs, f32 as the avx512 variant.
int64_t WeightSizeAny(const TileGemmArgs& args, int64_t tile) {
  return args.bf16 ? WeightSizePairs(*args.p, tile) : WeightSize(args, tile);
}
void PackWeightsAny(const TileGemmArgs& args, int64_t tile, float* b) {
  if (args.bf16) PackWeightsPairs(args, tile, b);
  else PackWeights(args, tile, b);
}
void RowsAny(const TileGemmArgs& args, int64_t m_begin, int64_t m_end, int64_t t_begin, int64_t t_end) {
  if (args.bf16) RowsPairs(args, m_begin, m_end, t_begin, t_end);
  else Rows(args, m_begin, m_end, t_begin, t_end);
}
#endif  // TW_PAIRS

}  // namespace

TileKernel Kernel() {
#if defined(TW_PAIRS)
  return TileKernel{TW_ISA_NAME, MR, 32, VL, WeightSizeAny, PackWeightsAny, RowsAny, Few};
#else
  return TileKernel{TW_ISA_NAME, MR, MR, VL, WeightSize, PackWeights, Rows, Few};
#endif
}

}  // namespace TW_NS
}  // namespace jax_tw
