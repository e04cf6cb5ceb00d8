// Host-side checks of the index assumptions the Hopper tile GEMM (cuda/tw_cuda_sm90.cu) makes
// about its CUTLASS configuration (cuda/tw_cuda_sm90_config.h). Built with nvcc and run on the
// CPU by tests/test_cuda.py; exit code 0 and "sm90 ok" when every check holds.
//
// 1. Shared memory: the CTA's storage (the stages, the epilogue's staging beside them, the
//    pipeline's barriers) fits the opt-in limit of an H100/H200 (232,448 bytes), with at least
//    4 stages.
// 2. The K gather (Sm90Operands, shared with the kernel): for tiles of depth 1 to 256 (below,
//    at and above the 64-row k-block), column chunks of 64 and 128 (G <= 64 and above), M not a
//    multiple of 128, every M block, and kept K
//    indices with corrupt entries, every 16-byte copy the producers issue (under the
//    collective's own predicates: the partial first k-block, the M and N residues) reads x at
//    (clamped kept index, m) and the weights at (kept row, n); each (m, q) and (n, q) of the
//    tile is read exactly once; corrupt indices read row k, the zero feature.
// 3. Shared-memory destinations: each copy lands on 8 contiguous, 16-byte aligned elements
//    at the coordinates it was read for, and a stage is written exactly once.
// 4. Epilogue: staged 64 rows at a time, the consumer warpgroup's accumulators cover the
//    128 x BN block exactly once and index inside the staging buffer.
// 5. The persistent walk (ForEachSm90Unit, Sm90UnitOf, shared with the kernel): on random
//    layers (BN 64 and 128 against G 12 to 300, empty tiles, M not a multiple of 128) and grids
//    of 1 CTA to more CTAs than units, each CTA takes its units in the schedule's order, every
//    unit is taken by exactly one CTA, each unit's k-blocks cover its tile's depth, and every
//    (row, output column) of y is written exactly once.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "host_check.h"
#include "tw_cuda_sm90_config.h"

using namespace cute;
using namespace jax_tw::cuda;
using T = cutlass::bfloat16_t;

template <int kBN>
void CheckGather(std::mt19937& rng) {
  using Mainloop = Sm90Mainloop<kBN>;
  constexpr int BM = 128, BK = 64;
  const int m_rows = 200, k = 1000, ldv = 136, g = 136;  // ldv: G padded to whole 16-byte runs
  T* x = reinterpret_cast<T*>(0x100000);  // fake bases: only addresses are compared
  T* values = reinterpret_cast<T*>(0x4000000);
  for (int depth : {1, 63, 64, 65, 130, 256}) {
    for (bool corrupt : {false, true}) {
      std::vector<int32_t> all(k);
      for (int i = 0; i < k; ++i) all[i] = i;
      std::shuffle(all.begin(), all.end(), rng);
      std::vector<int32_t> rows(all.begin(), all.begin() + depth);
      std::sort(rows.begin(), rows.end());
      if (corrupt) rows[depth / 2] = rows[depth / 2] + 1000000, rows[0] = -5;
      const int begin = 7;  // the tile's rows start inside the layer's arrays
      std::vector<int32_t> layer_rows(begin, 0);
      layer_rows.insert(layer_rows.end(), rows.begin(), rows.end());
      Params p{};
      p.k = k; p.n = 500; p.g = g; p.m_rows = m_rows; p.ldv = ldv;
      p.rows = layer_rows.data(); p.xt = x; p.values = values;
      for (int chunk = 0; chunk < (ldv + kBN - 1) / kBN; ++chunk) {
        CtaWork work{};
        work.begin = begin; work.end = begin + depth;
        for (int mb = 0; mb < (m_rows + BM - 1) / BM; ++mb) {
          auto ops = Sm90Operands<kBN>(p, work, chunk, mb);
          Tensor gA_in = get<0>(ops);
          Tensor gB_in = get<1>(ops);
          const int residue_m = get<0>(get<2>(ops)), residue_n = get<1>(get<2>(ops));
          const int residue_k = get<2>(get<2>(ops));
          const int k_tiles = size<2>(gA_in);
          CHECK(k_tiles == (depth + BK - 1) / BK && residue_k <= 0 && residue_k > -BK, "depth %d", depth);
          CHECK(residue_n == std::min(kBN, std::max(0, ldv - kBN * chunk)), "chunk %d: residue_n %d", chunk, residue_n);
          // The collective shifts its tensors by the K residue: the first k-block is the partial one.
          Tensor gA = domain_offset(make_coord(0, residue_k, 0), gA_in);
          Tensor gB = domain_offset(make_coord(0, residue_k, 0), gB_in);
          typename Mainloop::GmemTiledCopyA copy_a;
          typename Mainloop::GmemTiledCopyB copy_b;
          std::vector<int> hit_a(BM * depth, 0), hit_b(kBN * depth, 0);
          Tensor id_a = make_identity_tensor(Shape<_128, _64>{});
          Tensor id_b = make_identity_tensor(Shape<Int<kBN>, _64>{});
          for (int t = 0; t < kSm90LoadThreads<kBN>; ++t) {
            auto ta = copy_a.get_slice(t);
            auto tb = copy_b.get_slice(t);
            Tensor tAgA = ta.partition_S(gA);
            Tensor tAcA = ta.partition_S(id_a);
            Tensor tBgB = tb.partition_S(gB);
            Tensor tBcB = tb.partition_S(id_b);
            for (int kt = 0; kt < k_tiles; ++kt) {
              for (int i = 0; i < size<1>(tAgA); ++i)
                for (int j = 0; j < size<2>(tAgA); ++j) {
                  const int m = get<0>(tAcA(0, i, j)), kk = get<1>(tAcA(0, i, j));
                  if (!(kt > 0 || kk >= -residue_k) || !(m < residue_m)) continue;  // its predicates
                  const int q = kt * BK + kk + residue_k;
                  CHECK(q >= 0 && q < depth, "depth %d: q %d", depth, q);
                  Tensor v = recast<uint128_t>(tAgA(_, i, j, kt));  // what the 16-byte cp.async reads
                  const T* at = reinterpret_cast<const T*>(&v(0));
                  const int32_t r = rows[q], kept = r >= 0 && r < k ? r : k;
                  const long want = long(kept) * m_rows + mb * BM + m;
                  CHECK(at - x == want, "depth %d mb %d: A at %ld, expected %ld (q %d)", depth, mb, long(at - x), want, q);
                  for (int e = 0; e < 8; ++e)
                    if (mb * BM + m + e < m_rows) ++hit_a[(m + e) * depth + q];
                }
              for (int i = 0; i < size<1>(tBgB); ++i)
                for (int j = 0; j < size<2>(tBgB); ++j) {
                  const int n = get<0>(tBcB(0, i, j)), kk = get<1>(tBcB(0, i, j));
                  if (!(kt > 0 || kk >= -residue_k) || !(n < residue_n)) continue;
                  const int q = kt * BK + kk + residue_k;
                  const T* at = &tBgB(0, i, j, kt);
                  CHECK(at - values == long(begin + q) * ldv + kBN * chunk + n, "B at %ld", long(at - values));
                  for (int e = 0; e < 8; ++e) ++hit_b[(n + e) * depth + q];
                }
            }
          }
          for (int m = 0; m < std::min(BM, m_rows - mb * BM); ++m)
            for (int q = 0; q < depth; ++q)
              CHECK(hit_a[m * depth + q] == 1, "depth %d: A (%d, %d) read %d times", depth, m, q, hit_a[m * depth + q]);
          for (int n = 0; n < residue_n; ++n)
            for (int q = 0; q < depth; ++q)
              CHECK(hit_b[n * depth + q] == 1, "depth %d: B (%d, %d) read %d times", depth, n, q, hit_b[n * depth + q]);
        }
      }
    }
  }
}

template <int kBN>
void CheckSharedMemory() {
  using Mainloop = Sm90Mainloop<kBN>;
  CHECK(sizeof(Sm90Smem<kBN>) <= 232448, "%zu shared bytes", sizeof(Sm90Smem<kBN>));
  CHECK(Mainloop::DispatchPolicy::Stages >= 4, "%d stages", Mainloop::DispatchPolicy::Stages);
  typename Mainloop::SmemLayoutA layout;
  std::vector<T> buffer(cosize(layout));
  T* base = buffer.data();
  Tensor sA = make_tensor(make_smem_ptr(base), layout);
  typename Mainloop::GmemTiledCopyA copy_a;
  std::vector<int> hits(128 * 64, 0);
  for (int t = 0; t < kSm90LoadThreads<kBN>; ++t) {
    Tensor d = copy_a.get_slice(t).partition_D(sA);
    Tensor c = copy_a.get_slice(t).partition_S(make_identity_tensor(Shape<_128, _64>{}));
    for (int i = 0; i < size<1>(d); ++i)
      for (int j = 0; j < size<2>(d); ++j) {
        T* first = &d(0, i, j, 0);
        CHECK((first - base) % 8 == 0, "copy (%d, %d) of thread %d misaligned", i, j, t);
        for (int v = 0; v < 8; ++v) {
          const int m = get<0>(c(v, i, j)), kk = get<1>(c(v, i, j));
          CHECK(&d(v, i, j, 0) == first + v && &sA(m, kk, 0) == first + v, "(%d, %d) stored elsewhere", m, kk);
          ++hits[m + 128 * kk];
        }
      }
  }
  for (int h : hits) CHECK(h == 1, "a stage element written %d times", h);
}

template <int kBN>
void CheckEpilogue() {
  typename Sm90Mainloop<kBN>::TiledMma mma;
  using Epi = EpilogueStorage<Sm90Staged<kBN>>;
  CHECK(kSm90MmaThreads<kBN> == 128, "%d consumer threads", kSm90MmaThreads<kBN>);
  std::vector<int> out(128 * kBN, 0);
  for (int t = 0; t < kSm90MmaThreads<kBN>; ++t) {
    Tensor c = mma.get_slice(t).partition_C(make_identity_tensor(Shape<_128, Int<kBN>>{}));
    Tensor acc = partition_fragment_C(mma, Shape<_128, Int<kBN>>{});
    CHECK(size(acc) == size(c), "accumulators and coordinates differ in size");
    CHECK(size<1>(acc) * Epi::kRows == 128, "%d m64 atoms", int(size<1>(acc)));
    for (int half = 0; half < size<1>(acc); ++half) {  // as the kernel stages them
      Tensor c_h = c(_, half, _);
      for (int i = 0; i < size(c_h); ++i) {
        const int m = get<0>(c_h(i)), n = get<1>(c_h(i)), row = m - half * Epi::kRows;
        CHECK(row >= 0 && row < Epi::kRows && n >= 0 && n < kBN, "half %d: staged at (%d, %d)", half, row, n);
        if (m >= 0 && m < 128 && n >= 0 && n < kBN) ++out[m * kBN + n];
      }
    }
  }
  for (int h : out) CHECK(h == 1, "an output element staged %d times", h);
}

// 5. One random layer of n columns, c kept, tile size g, M = m_rows.
template <int kBN>
void CheckPersistentWalk(std::mt19937& rng, int n, int c, int g, int m_rows) {
  const RandomLayer layer(rng, n, c, g, 200, 4);
  Params p{};
  layer.Fill(p);
  p.m_rows = m_rows;
  p.m_blocks = (m_rows + 127) / 128;  // as LaunchSm90With sets them
  p.n_chunks = (g + kBN - 1) / kBN;
  const int64_t units = p.m_blocks * p.n_chunks * layer.t;
  for (int64_t ctas : {int64_t(1), int64_t(7), int64_t(132), units, units + 5}) {
    std::vector<int> taken(units, 0);
    std::vector<int> written(int64_t(m_rows) * n, 0);
    for (int64_t cta = 0; cta < std::min(ctas, units); ++cta) {
      int64_t last = -1;
      ForEachSm90Unit<kBN>(p, cta, ctas, [&](const Sm90Unit& u) {
        // Recover the unit's index from what the kernel sees, independently of Sm90UnitOf.
        const int64_t pos = std::find(layer.order.begin(), layer.order.end(), int32_t(u.work.tile)) - layer.order.begin();
        const int64_t unit = (pos * p.n_chunks + u.chunk) * p.m_blocks + u.mb;
        CHECK(unit > last && unit % ctas == cta, "ctas %lld: CTA %lld took unit %lld after %lld", (long long)ctas,
              (long long)cta, (long long)unit, (long long)last);
        last = unit;
        if (unit < 0 || unit >= units) return;
        ++taken[unit];
        const int depth = layer.offsets[u.work.tile + 1] - layer.offsets[u.work.tile];
        CHECK(u.k_tiles * 64 >= depth && u.k_tiles * 64 < depth + 64, "depth %d in %d k-blocks", depth, u.k_tiles);
        const int64_t rows = std::min<int64_t>(128, m_rows - u.mb * 128);
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < u.work.width; ++j) ++written[(u.mb * 128 + i) * n + layer.columns[u.work.col0 + j]];
          for (int64_t q = u.work.pruned_begin; q < u.work.pruned_end; ++q) ++written[(u.mb * 128 + i) * n + layer.pruned[q]];
        }
      });
    }
    for (int64_t u = 0; u < units; ++u) CHECK(taken[u] == 1, "ctas %lld: unit %lld taken %d times", (long long)ctas, (long long)u, taken[u]);
    for (size_t e = 0; e < written.size(); ++e)
      CHECK(written[e] == 1, "n %d c %d g %d M %d bn %d ctas %lld: y entry (%zu, %zu) written %d times", n, c, g, m_rows,
            kBN, (long long)ctas, e / n, e % n, written[e]);
  }
}

int main() {
  std::mt19937 rng(0);
  for (int g : {12, 64, 100, 128, 200, 256, 300})
    for (int trial = 0; trial < 6; ++trial) {
      const int n = 1 + int(rng() % 600);
      const int c = trial == 0 ? n : trial == 1 ? 1 : 1 + int(rng() % n);  // none / all but one pruned
      const int m_rows = trial % 2 ? 8 : 8 * (1 + int(rng() % 50));
      CheckPersistentWalk<64>(rng, n, c, g, m_rows);
      CheckPersistentWalk<128>(rng, n, c, g, m_rows);
    }
  CheckSharedMemory<64>();
  CheckSharedMemory<128>();
  CheckGather<64>(rng);
  CheckGather<128>(rng);
  CheckEpilogue<64>();
  CheckEpilogue<128>();
  CHECK(Sm90ChunkFor(12) == 64 && Sm90ChunkFor(64) == 64 && Sm90ChunkFor(65) == 128 && Sm90ChunkFor(256) == 128,
        "chunk choice");
  std::printf("BN 64: %d + %d threads, %d stages, %zu shared bytes; BN 128: %d + %d threads, %d stages, %zu shared bytes\n",
              kSm90LoadThreads<64>, kSm90MmaThreads<64>, Sm90Mainloop<64>::DispatchPolicy::Stages, sizeof(Sm90Smem<64>),
              kSm90LoadThreads<128>, kSm90MmaThreads<128>, Sm90Mainloop<128>::DispatchPolicy::Stages,
              sizeof(Sm90Smem<128>));
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("sm90 ok\n");
  return 0;
}
