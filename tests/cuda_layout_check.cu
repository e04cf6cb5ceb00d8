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
#include <cstdio>
#include <vector>

#include "tw_cuda_config.h"

using namespace cute;
using namespace jax_tw::cuda;

static int failures = 0;
#define CHECK(cond, ...)                    \
  do {                                      \
    if (!(cond)) {                          \
      if (failures++ < 10) {                \
        std::printf("FAILED %s: ", #cond);  \
        std::printf(__VA_ARGS__);           \
        std::printf("\n");                  \
      }                                     \
    }                                       \
  } while (0)

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
  std::printf("%s: %d threads, %d-value copies, %d shared bytes: checked\n", name, threads, kVec,
              int(sizeof(SharedStorage<Cfg>)));
}

int main() {
  Check<Bf16Config>("bf16");
  Check<F32Config>("f32");
  if (failures) {
    std::printf("%d checks failed\n", failures);
    return 1;
  }
  std::printf("layout ok\n");
  return 0;
}
