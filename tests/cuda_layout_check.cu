// Host-side checks of the index assumptions the CUDA tile GEMM (cuda/tw_cuda.cu) makes about its
// CuTe configurations (cuda/tw_cuda_config.h). Built with nvcc and run on the CPU by
// tests/test_cuda.py; exit code 0 and "layout ok" when every check holds.
//
// 1. Global-to-shared copies: every thread's 16-byte copy lands on kVec consecutive, 16-byte
//    aligned shared-memory elements, whose tile coordinates are consecutive along M (or N) at
//    one K, and together the threads write every element of a stage exactly once. (The kernel
//    computes a copy's source address from the coordinate of its first element.)
// 2. Epilogue: the accumulator coordinates of all threads cover the BM x BN tile exactly once.
// 3. The shared-memory copies to registers for the MMA are constructible (static checks).
// 4. Depth not a multiple of BK: over a tile's k-tiles, the copies load every (m, q) with q below
//    the depth exactly once and zero-fill the rest.
// 5. Epilogue staging: the accumulator coordinates index inside the staged buffer, and the
//    epilogue's shared memory fits the stages' bytes or the device limit.
// 6. The schedule (WorkOf): on random layers (partial last tiles, tiles with no kept rows, G above
//    and below BN, every column pruned but one, none pruned) the CTAs of all units write every
//    output column exactly once: their chunk's kept columns, and chunk 0 its span's pruned ones.
//    The schedule is computed here independently of packing.schedule.
// 7. The epilogue's thread loops (ForRowsCols) visit every (row, column) of a block exactly once,
//    and the M blocks cover every row once when M is not a multiple of BM.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "host_check.h"
#include "tw_cuda_config.h"

using namespace cute;
using namespace jax_tw::cuda;

template <class Cfg>
void Check(const char* name) {
  using T = typename Cfg::T;
  using BM = typename Cfg::BM;
  using BN = typename Cfg::BN;
  using BK = typename Cfg::BK;
  constexpr int kVec = 16 / sizeof(T);
  typename SharedStorage<Cfg>::SmemLayout layout;
  std::vector<T> buffer(cosize(layout));
  T* base = buffer.data();
  Tensor sA = make_tensor(make_smem_ptr(base), layout);  // (BM, BK, stage)
  typename Cfg::TiledMma mma;
  typename Cfg::GmemCopy gmem_copy;
  const int threads = size(mma);
  CHECK(int(size(gmem_copy)) == threads, "%s: copy threads %d != MMA threads %d", name,
        int(size(gmem_copy)), threads);

  // 1. copies
  std::vector<int> hits(BM::value * BK::value, 0);
  for (int t = 0; t < threads; ++t) {
    auto thr = gmem_copy.get_slice(t);
    Tensor tAsA = thr.partition_D(sA);
    Tensor coord = thr.partition_S(make_identity_tensor(make_shape(BM{}, BK{})));
    CHECK(int(size<0>(tAsA)) == kVec, "%s: %d values per copy", name, int(size<0>(tAsA)));
    for (int i = 0; i < size<1>(tAsA); ++i) {
      for (int j = 0; j < size<2>(tAsA); ++j) {
        T* first = &tAsA(0, i, j, 0);
        CHECK((first - base) * sizeof(T) % 16 == 0, "%s: thread %d copy (%d,%d) misaligned", name, t, i, j);
        const int m0 = get<0>(coord(0, i, j)), k0 = get<1>(coord(0, i, j));
        CHECK(m0 % kVec == 0, "%s: copy starts at m = %d", name, m0);
        for (int v = 0; v < kVec; ++v) {
          const int m = get<0>(coord(v, i, j)), k = get<1>(coord(v, i, j));
          CHECK(m == m0 + v && k == k0, "%s: value %d at (%d,%d), expected (%d,%d)", name, v, m, k, m0 + v, k0);
          CHECK(&tAsA(v, i, j, 0) == first + v, "%s: value %d not contiguous", name, v);
          CHECK(&sA(m, k, 0) == &tAsA(v, i, j, 0), "%s: (%d,%d) stored elsewhere", name, m, k);
          if (m >= 0 && m < BM::value && k >= 0 && k < BK::value) ++hits[m + k * BM::value];
        }
      }
    }
  }
  for (int h : hits) CHECK(h == 1, "%s: a stage element written %d times", name, h);
  // Stages are disjoint: stage s's first element lies past every element of stage s - 1.
  CHECK(&sA(0, 0, 1) - base >= BM::value * BK::value, "%s: stages overlap", name);

  // 2. epilogue coverage
  std::vector<int> out(BM::value * BN::value, 0);
  for (int t = 0; t < threads; ++t) {
    auto thr = mma.get_slice(t);
    Tensor c = thr.partition_C(make_identity_tensor(make_shape(BM{}, BN{})));
    Tensor acc = partition_fragment_C(mma, make_shape(BM{}, BN{}));
    CHECK(size(acc) == size(c), "%s: accumulator and coordinates differ in size", name);
    for (int i = 0; i < size(c); ++i) {
      const int m = get<0>(c(i)), n = get<1>(c(i));
      if (m >= 0 && m < BM::value && n >= 0 && n < BN::value) ++out[m + n * BM::value];
    }
  }
  for (int h : out) CHECK(h == 1, "%s: an output element computed %d times", name, h);

  // 3. shared-memory-to-register copies for the MMA
  auto s2r_a = make_tiled_copy_A(typename Cfg::SmemCopyAtom{}, mma);
  auto s2r_b = make_tiled_copy_B(typename Cfg::SmemCopyAtom{}, mma);
  CHECK(int(size(s2r_a)) == threads && int(size(s2r_b)) == threads, "%s: s2r threads", name);
  // 4. depth not a multiple of BK (the kernel's load_stage predicate q < depth)
  for (int depth : {0, 1, BK::value - 1, BK::value, BK::value + 1, 3 * BK::value + 5}) {
    std::vector<int> loaded(BM::value * (depth + 1), 0);
    const int k_tiles = (depth + BK::value - 1) / BK::value;
    for (int kt = 0; kt < std::max(k_tiles, 1); ++kt)
      for (int t = 0; t < threads; ++t) {
        Tensor coord = gmem_copy.get_slice(t).partition_S(make_identity_tensor(make_shape(BM{}, BK{})));
        for (int i = 0; i < size<1>(coord); ++i)
          for (int j = 0; j < size<2>(coord); ++j) {
            const int q = kt * BK::value + get<1>(coord(0, i, j));
            if (q >= depth) continue;  // zero-filled
            for (int v = 0; v < kVec; ++v) ++loaded[get<0>(coord(v, i, j)) * (depth + 1) + q];
          }
      }
    for (int m = 0; m < BM::value; ++m)
      for (int q = 0; q < depth; ++q)
        CHECK(loaded[m * (depth + 1) + q] == 1, "%s: depth %d: (m %d, q %d) loaded %d times", name,
              depth, m, q, loaded[m * (depth + 1) + q]);
  }

  // 5. epilogue staging
  using Epi = EpilogueStorage<Cfg>;
  for (int t = 0; t < threads; ++t) {
    Tensor c = mma.get_slice(t).partition_C(make_identity_tensor(make_shape(BM{}, BN{})));
    for (int i = 0; i < size(c); ++i) {
      const int at = get<0>(c(i)) * Epi::kLdc + get<1>(c(i));
      CHECK(at >= 0 && at < BM::value * Epi::kLdc && get<1>(c(i)) < BN::value, "%s: staged at %d", name, at);
    }
  }
  CHECK(SmemBytes<Cfg>() <= 227 * 1024, "%s: %d shared bytes", name, SmemBytes<Cfg>());
  std::printf("%s: %d threads, %d-value copies, %d shared bytes: checked\n", name, threads, kVec,
              SmemBytes<Cfg>());
}

// 6. One random layer: n columns, c kept, tile size g; every output column written once.
void CheckSchedule(std::mt19937& rng, int n, int c, int g, int bn) {
  const RandomLayer layer(rng, n, c, g, 40, 3);
  jax_tw::PackedTilesView p;
  layer.Fill(p);
  const int64_t n_chunks = (g + bn - 1) / bn;
  std::vector<int> written(n, 0), units_of_tile(layer.t, 0);
  for (int64_t unit = 0; unit < layer.t * n_chunks; ++unit) {
    const CtaWork w = WorkOf(p, unit, n_chunks, bn);
    ++units_of_tile[w.tile];
    CHECK(w.tile == layer.order[unit / n_chunks] && w.begin == layer.offsets[w.tile] && w.end == layer.offsets[w.tile + 1],
          "n %d c %d g %d: unit %lld tile %lld rows [%lld, %lld)", n, c, g, (long long)unit,
          (long long)w.tile, (long long)w.begin, (long long)w.end);
    CHECK(w.width >= 0 && w.width <= bn, "width %lld", (long long)w.width);
    for (int64_t j = 0; j < w.width; ++j) ++written[layer.columns[w.col0 + j]];
    for (int64_t q = w.pruned_begin; q < w.pruned_end; ++q) ++written[layer.pruned[q]];
  }
  for (int i = 0; i < layer.t; ++i) CHECK(units_of_tile[i] == n_chunks, "tile %d in %d units", i, units_of_tile[i]);
  for (int j = 0; j < n; ++j)
    CHECK(written[j] == 1, "n %d c %d g %d bn %d: column %d written %d times", n, c, g, bn, j, written[j]);
}

// 7. thread loops
void CheckThreadLoops() {
  for (int threads : {128, 256})
    for (int rows : {1, 37, 128})
      for (int cols : {0, 1, 31, 33, 128, 300}) {
        std::vector<int> seen(rows * std::max(cols, 1), 0);
        for (int tid = 0; tid < threads; ++tid)
          ForRowsCols(tid, threads, rows, cols, [&](int64_t i, int64_t j) { ++seen[i * cols + j]; });
        for (int e = 0; e < rows * cols; ++e)
          CHECK(seen[e] == 1, "threads %d rows %d cols %d: entry %d seen %d times", threads, rows, cols, e, seen[e]);
      }
  for (int m_rows : {1, 127, 128, 129, 1000}) {  // the kernel's rows = clamp(M - m0, 0, BM)
    const int bm = 128, m_blocks = (m_rows + bm - 1) / bm;
    std::vector<int> seen(m_rows, 0);
    for (int mb = 0; mb < m_blocks; ++mb)
      for (int64_t i = 0; i < Clamp(m_rows - mb * bm, 0, bm); ++i) ++seen[mb * bm + i];
    for (int h : seen) CHECK(h == 1, "M %d: a row written %d times", m_rows, h);
  }
}

int main() {
  Check<Bf16Config>("bf16");
  Check<F32Config>("f32");
  Check<Tf32Config>("tf32");
  std::mt19937 rng(0);
  for (int g : {12, 64, 128, 200, 256, 300})
    for (int trial = 0; trial < 20; ++trial) {
      const int n = 1 + int(rng() % 700);
      const int c = trial == 0 ? n : trial == 1 ? 1 : 1 + int(rng() % n);  // none / all but one pruned
      CheckSchedule(rng, n, c, g, Bf16Config::BN::value);
    }
  std::printf("schedule: checked\n");
  CheckThreadLoops();
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("layout ok\n");
  return 0;
}
