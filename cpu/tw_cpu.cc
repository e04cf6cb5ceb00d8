// jax_tw._cpu: the XLA FFI handler of tw_matmul on the host, and its pybind11 module.
//
//   y[M, N] = x[M, K] @ W + bias, W given as packed tiles with their residue (packed_tiles.h),
//   y in f32 or x's dtype.
// Work runs on XLA's intra-op thread pool (see tw_kernel.h): the tiles' weights are copied where
// the GEMM does not read them in place (in parallel over tiles, or by the one work item that
// uses each), then blocks of rows compute every tile and write every span of y.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(JAX_TW_HAVE_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#endif

#include "packed_tiles.h"
#include "tw_kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_tw {
namespace {

#if defined(JAX_TW_HAVE_AMX)
// Whether this process may run AMX tile instructions: the CPU has AMX-BF16 and Linux grants the
// tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Linux 5.16 and later;
// without it the first tile instruction faults). Asked at import, for the whole process. Linux
// refuses it where a thread's sigaltstack is too small for the tile data; the avx512 variant
// then runs.
bool AmxUsable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = edx & (1u << 24), bf16 = edx & (1u << 22);
  if (!tile || !bf16) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

// The widest variant this CPU runs; JAX_TW_ISA=generic|avx2|avx512|avx512-bf16 (read at import)
// asks for a narrower one, so that tests can run every variant this machine supports.
TileKernel ChooseKernel() {
  const char* want = std::getenv("JAX_TW_ISA");
  const std::string ask = want ? want : "";
  if (ask == "generic") return generic::Kernel();
#if defined(__x86_64__) && defined(JAX_TW_HAVE_X86_VARIANTS)
  __builtin_cpu_init();
#if defined(JAX_TW_HAVE_AMX)
  if (ask.empty() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && AmxUsable())
    return avx512_amx::Kernel();
#endif
#if defined(JAX_TW_HAVE_DPBF16)
  if ((ask.empty() || ask == "avx512-bf16") && __builtin_cpu_supports("avx512bf16") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return avx512_bf16::Kernel();
#endif
  if (__builtin_cpu_supports("avx512f") && ask != "avx2") return avx512::Kernel();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::Kernel();
#endif
  return generic::Kernel();
}

const TileKernel kKernel = ChooseKernel();

// How long the calling thread spins for the helpers' last items before it blocks (ParallelFor).
// Blocked on the condition variable, it was woken late, and the helpers ran slower meanwhile: at
// M = 1 on 768 x 768 (TW-2D 75%, f32) a call took 17 us against 6.7 us spinning, of which the
// caller's own items took 4 us and waiting for the helper 9.5 us (BUILD_NOTES.md).
constexpr auto kSpinWait = std::chrono::microseconds(200);

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Runs f(0..n-1) on the pool and the calling thread; returns once every call finished.
// Tasks that start late find no work left and return without touching f.
template <class F>
std::string ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
    std::string error;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &f] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      try {
        f(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->error = e.what();
      }
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  const auto spin_until = std::chrono::steady_clock::now() + kSpinWait;
  while (state->done.load(std::memory_order_acquire) != n && std::chrono::steady_clock::now() < spin_until)
    Pause();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
  return state->error;
}

// Rows of x per work item: enough items for every thread to take several (the last ones to
// finish are then short), each a whole number of panels and at most kRowsPerItem rows, or
// kResidueRowsPerItem in a layer with a residue (see there).
int64_t RowsPerItem(int64_t m, int64_t threads, bool residue, bool bf16) {
  const int64_t mr = bf16 ? kKernel.mr_bf16 : kKernel.mr, items = 8 * std::max<int64_t>(threads, 1);
  const int64_t most = residue ? kResidueRowsPerItem : kRowsPerItem;
  const int64_t rows = ((m + items - 1) / items + mr - 1) / mr * mr;
  return std::min(std::max(rows, 4 * mr), most / mr * mr);
}

// This CPU's L1 data cache: sets and ways (sysconf; 64 sets of 8 ways where it does not say).
struct L1Cache {
  int64_t sets, ways;
};
const L1Cache& L1() {
  static const L1Cache l1 = [] {
    const long size = sysconf(_SC_LEVEL1_DCACHE_SIZE), ways = sysconf(_SC_LEVEL1_DCACHE_ASSOC);
    if (size <= 0 || ways <= 0 || size % (ways * 64) != 0) return L1Cache{64, 8};
    return L1Cache{size / (ways * 64), ways};
  }();
  return l1;
}

// Whether an f32 layer with `kept` tile weights reads x's rows in place (TileGemmArgs::direct_x):
// few kept weights per column of x (kDirectWeightsPerK), and the MR rows a micro-kernel reads at
// each kept K index (K floats apart) fit the L1 set they fall in. At K = 3072 or 1024 all MR
// rows' lines share one set: on a 12-way L1 (48 KB) in place was still 8-17% faster at 75-90%
// TW-2D (3072 x 768, M = 2048), on an 8-way one (32 KB) packing was 9-22% faster, TEW 19%
// (BUILD_NOTES.md).
bool XInPlace(int64_t k, int64_t kept) {
  if (kept > kDirectWeightsPerK * k) return false;
  const L1Cache& l1 = L1();
  auto set = [&](int64_t i) { return i * k * static_cast<int64_t>(sizeof(float)) / 64 % l1.sets; };
  int64_t most = 0;
  for (int64_t i = 0; i < kKernel.mr; ++i) {
    int64_t same = 0;
    for (int64_t j = 0; j < kKernel.mr; ++j) same += set(j) == set(i);
    most = std::max(most, same);
  }
  return most <= l1.ways;
}

// Room in `buffer` for tiles [t_begin, t_end)'s weights in the layout their GEMM reads
// (TileKernel::weight_size), each copy on its own 64-byte line: tile t's starts at the returned
// (aligned) base + weight_offsets[t]; *total floats in all (0: f32 weights read in place).
float* WeightSlots(const TileGemmArgs& args, int64_t t_begin, int64_t t_end, std::vector<float>& buffer,
                   int64_t* weight_offsets, int64_t* total) {
  int64_t at = 0;
  for (int64_t t = t_begin; t < t_end; ++t) {
    weight_offsets[t] = at;
    at += (kKernel.weight_size(args, t) + 15) / 16 * 16;
  }
  buffer.resize(at + 16);
  const auto addr = reinterpret_cast<uintptr_t>(buffer.data());
  *total = at;
  return buffer.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

// A call with more than kSmallRows rows (see tw_kernel.h).
std::string TileGemm(ffi::ThreadPool& pool, TileGemmArgs& args) {
  const PackedTilesView& p = *args.p;
  if (!args.bf16) {
    int64_t kept = 0;
    for (int64_t t = 0; t < p.t; ++t) kept += p.depth(t) * p.width(t);
    args.direct_x = XInPlace(p.k, kept);
  }
  // Work items: blocks of rows, every tile each. Threads share equal items best when there are
  // at least two per thread and a whole number per thread, so with too few blocks (M up to a few
  // hundred) the spans are split into ranges too: each range's item packs its rows of x again,
  // cheap next to an idle thread (M = 64 at 768 x 3072: 2.21 -> 1.83 ms, BUILD_NOTES.md).
  // With at least two blocks per thread, a whole number of them per thread, sharing the rows'
  // panels evenly (at most one panel apart): blocks of `rows` rows and a short one at the end
  // left a thread idle for part of an item (M = 2048 took as long as M = 2112, whole items;
  // shared evenly, M = 2048 and 4096 ran 0.99-1.06x as fast, BUILD_NOTES.md). Fewer blocks keep
  // `rows` rows each (M = 64 shared evenly: 1.15-1.22x slower).
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t rows = RowsPerItem(args.m, threads, p.e > 0, args.bf16);
  int64_t blocks = (args.m + rows - 1) / rows;
  const bool even = blocks >= 2 * threads;
  const int64_t mr = args.bf16 ? kKernel.mr_bf16 : kKernel.mr, panels = (args.m + mr - 1) / mr;
  // (At most one block per panel: `rows` is at least two panels, so rounding up never empties one.)
  if (even) blocks = std::min(panels, (blocks + threads - 1) / threads * threads);
  const auto block_row = [&](int64_t b) { return std::min(args.m, even ? b * panels / blocks * mr : b * rows); };
  const int64_t spans = Spans(p);
  int64_t groups = 1;
  while (groups < spans && (blocks * groups < 2 * threads || blocks * groups % threads != 0))
    ++groups;
  // Step 1: the tiles' weights copied into the layout their GEMM reads. With several blocks of
  // rows, once for the call, in parallel over tiles, before any item runs. With one block each
  // tile belongs to one item, which copies its own tiles just before it needs them: no pass of
  // its own to wait for. The buffers are reused across calls by each thread; workers see the
  // calling thread's through plain pointers (a thread_local named inside a worker is its own,
  // as the items' are).
  const bool per_item = blocks == 1;
  if (!per_item) {
    thread_local std::vector<float> weight_buffer;
    thread_local std::vector<int64_t> offsets_buffer;
    offsets_buffer.resize(p.t + 1);
    int64_t* offsets = offsets_buffer.data();
    int64_t total;
    float* weights = WeightSlots(args, 0, p.t, weight_buffer, offsets, &total);
    if (total > 0) {
      std::string err = ParallelFor(pool, p.t, [&](int64_t t) {
        kKernel.pack_weights(args, t, weights + offsets[t]);
      });
      if (!err.empty()) return err;
    }
    args.weights = weights;
    args.weight_offsets = offsets;
  }
  // Step 2: the items.
  return ParallelFor(pool, blocks * groups, [&](int64_t item) {
    const int64_t b = item / groups, g = item % groups, t0 = g * spans / groups, t1 = (g + 1) * spans / groups;
    if (!per_item) {
      kKernel.rows(args, block_row(b), block_row(b + 1), t0, t1);
      return;
    }
    thread_local std::vector<float> own_buffer;
    thread_local std::vector<int64_t> own_offsets;
    own_offsets.resize(p.t + 1);
    const int64_t t_end = std::min(t1, p.t);
    int64_t size;
    float* w = WeightSlots(args, t0, t_end, own_buffer, own_offsets.data(), &size);
    if (size > 0)  // else f32 weights read in place
      for (int64_t t = t0; t < t_end; ++t) kKernel.pack_weights(args, t, w + own_offsets[t]);
    TileGemmArgs own = args;
    own.weights = w;
    own.weight_offsets = own_offsets.data();
    kKernel.rows(own, block_row(b), block_row(b + 1), t0, t1);
  });
}

// x feature-major for the residue of a few-rows call (TileGemmArgs::xt): M floats per K index,
// not padded to whole vectors (at M = 1 a K = 768 x stays 3 KB, in L1; the lanes a vector read
// takes past an item's rows are never added to y), plus 16 floats of slack for the vector reads
// of the last ones. In a buffer of the calling thread (see TileGemm on thread_local).
void TransposeFew(TileGemmArgs& args) {
  thread_local std::vector<float> buffer;
  const int64_t m = args.m, k = args.p->k;
  buffer.resize(k * m + 16);
  float* xt = buffer.data();
  // The dtype tested once, not per element (which made TEW calls at M = 1-16 1.06-1.22x
  // slower, BUILD_NOTES.md); at M = 1, f32, a copy.
  const auto transpose = [&](auto load) {  // xt[q][i] = load(x's element i * k + q)
    for (int64_t q = 0; q < k; ++q)
      for (int64_t i = 0; i < m; ++i) xt[q * m + i] = load(i * k + q);
  };
  if (m == 1 && !args.bf16) std::memcpy(xt, args.x, k * sizeof(float));
  else if (args.bf16) transpose([&](int64_t j) { return LoadF32(args.x, j, true); });
  else transpose([x = static_cast<const float*>(args.x)](int64_t j) { return x[j]; });
  std::fill(xt + k * m, xt + k * m + 16, 0.f);
  args.xt = xt;
  args.ldxt = m;
}

// A call with at most kSmallRows rows: work items are (span, group of rows), enough of them to
// give every thread several even when the layer has few tiles. bf16 groups have at most a
// micro-kernel's rows, so that their weights are read in place (Few; M = 13-32 on 768 x 3072 at
// 75%: 1.09-1.22x). So do f32 groups without a residue where the micro-kernel has 12 rows
// (AVX-512; M = 13-32 on 768 x 3072 at 75%: 1.15-1.34x, other BERT shapes 0.97-1.03x; not with a
// residue, which every group walks: 0.87x at M = 24; nor on AVX2's 6 rows: 0.94-1.25x). With a
// residue, each group is at least a vector of rows: every group walks its span's residue weights
// once, so groups of 2 rows (M = 16, an EW layer's one span) read its indices 8 times where 2
// would do.
std::string FewRows(ffi::ThreadPool& pool, TileGemmArgs& args) {
  const int64_t spans = Spans(*args.p), m = args.m;
  int64_t groups = std::min(m, (4 * std::max<int64_t>(pool.num_threads(), 1) + spans - 1) / spans);
  if (args.bf16 || (args.p->e == 0 && kKernel.mr >= 12))
    groups = std::max(groups, (m + kKernel.mr - 1) / kKernel.mr);
  if (args.p->e > 0) {
    groups = std::min(groups, (m + kKernel.vl - 1) / kKernel.vl);
    TransposeFew(args);
  }
  const int64_t rows = (m + groups - 1) / groups;
  const int64_t per_span = (m + rows - 1) / rows;
  return ParallelFor(pool, spans * per_span, [&](int64_t item) {
    const int64_t t = item / per_span, m0 = (item % per_span) * rows;
    kKernel.few(args, t, m0, std::min(m, m0 + rows));
  });
}

// Whether a call takes the few-rows path (FewRows) rather than the blocked one (TileGemm): up to
// kSmallRows rows, but bf16 with a residue on the pair kernels (mr_bf16 > mr: VDPBF16PS, AMX)
// only below kPairResidueRows.
bool FewRowsPath(const TileGemmArgs& args) {
  if (args.m > kSmallRows) return false;
  const bool pairs = args.bf16 && kKernel.mr_bf16 > kKernel.mr;
  return !(pairs && args.p->e > 0 && args.m >= kPairResidueRows);
}

// y = activation(x @ W + bias) (bias: n f32 values, or none; activation: Activation in
// tw_kernel.h) in y's dtype (f32, or x's).
ffi::Error TwMatmul(ffi::ThreadPool& pool, ffi::AnyBuffer& x, ffi::Buffer<ffi::S32>& columns,
                    ffi::Buffer<ffi::S32>& row_offsets, ffi::Buffer<ffi::S32>& rows,
                    ffi::AnyBuffer& values, ffi::Buffer<ffi::S32>& residue_rows,
                    ffi::Buffer<ffi::S32>& residue_cols, ffi::AnyBuffer& residue_values,
                    const float* bias, ffi::AnyBuffer& y, int64_t n, int64_t tile_size,
                    int64_t activation = 0) {
  try {
    if (activation < 0 || activation > static_cast<int64_t>(Activation::kGelu))
      return ffi::Error::InvalidArgument("tw_matmul: activation must be 0 (none), 1 (relu) or 2 (gelu), got " +
                                         std::to_string(activation));
    const auto xd = x.dimensions();
    if (xd.size() != 2) return ffi::Error::InvalidArgument("tw_matmul: x must be 2-D (M, K)");
    const bool bf16 = x.element_type() == ffi::DataType::BF16;
    if (!bf16 && x.element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("tw_matmul: x must be float32 or bfloat16");
    if (values.element_type() != x.element_type() || residue_values.element_type() != x.element_type())
      return ffi::Error::InvalidArgument("tw_matmul: values, residue_values and x must share a dtype");
    if (y.element_type() != ffi::DataType::F32 && y.element_type() != x.element_type())
      return ffi::Error::InvalidArgument("tw_matmul: the output must be float32 or x's dtype");
    PackedTilesView p = PackedTilesView::Of(xd[1], n, tile_size, columns, row_offsets, rows);
    p.e = residue_rows.element_count();
    p.residue_rows = residue_rows.typed_data();
    p.residue_cols = residue_cols.typed_data();
    if (p.t < 0) return ffi::Error::InvalidArgument("tw_matmul: row_offsets is empty");
    if (residue_cols.element_count() != p.e || residue_values.element_count() != p.e)
      return ffi::Error::InvalidArgument("tw_matmul: residue arrays differ in length");
    const auto vd = values.dimensions();
    if (vd.size() != 2 || vd[0] != p.r || vd[1] != p.g)
      return ffi::Error::InvalidArgument("tw_matmul: values must be (len(rows), tile_size)");
    const auto yd = y.dimensions();
    if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != n)
      return ffi::Error::InvalidArgument("tw_matmul: output must be (M, n)");
    // The residue is checked span by span by the work items that read it (ResidueSound).
    std::string bad = p.Validate(/*residue=*/false);
    if (!bad.empty()) return ffi::Error::InvalidArgument("tw_matmul: corrupt packed tiles: " + bad);

    const int64_t m = xd[0];
    const bool y_bf16 = y.element_type() == ffi::DataType::BF16;
    TileGemmArgs args{&p, x.untyped_data(), values.untyped_data(), residue_values.untyped_data(),
                      bf16, m, bias, y.untyped_data(), y_bf16};
    args.stream = !y_bf16 && m * n * 4 >= kStreamBytes;
    args.activation = static_cast<Activation>(activation);
    // Test hook: JAX_TW_POISON_OUTPUT=1 fills y with NaN first, so any entry the kernel fails to
    // write shows up in the results.
    if (const char* poison = std::getenv("JAX_TW_POISON_OUTPUT"); poison && poison[0] == '1')
      std::memset(args.y, 0xff, m * n * (y_bf16 ? 2 : 4));  // all-ones bits: a NaN in both dtypes
    ResidueChecks checks;
    if (p.e > 0) checks.sound.reset(new std::atomic<bool>[Spans(p)]());  // read only with a residue
    args.residue_checks = &checks;
    if (m == 0) {  // no work item: the residue is checked here
      checks.corrupt = !p.Validate().empty();
    } else {
      std::string err = FewRowsPath(args) ? FewRows(pool, args) : TileGemm(pool, args);
      if (!err.empty()) return ffi::Error::Internal("tw_matmul: " + err);
    }
    if (checks.corrupt) return ffi::Error::InvalidArgument("tw_matmul: corrupt packed tiles: " + p.FirstBadIndex());
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("tw_matmul: ") + e.what());
  }
}

ffi::Error TwMatmulV1(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> columns,
                      ffi::Buffer<ffi::S32> row_offsets, ffi::Buffer<ffi::S32> rows,
                      ffi::AnyBuffer values, ffi::Buffer<ffi::S32> residue_rows,
                      ffi::Buffer<ffi::S32> residue_cols, ffi::AnyBuffer residue_values,
                      ffi::Result<ffi::AnyBuffer> y, int64_t n, int64_t tile_size) {
  if (y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("tw_matmul (v1): the output must be float32");
  return TwMatmul(pool, x, columns, row_offsets, rows, values, residue_rows, residue_cols,
                  residue_values, nullptr, *y, n, tile_size);
}

ffi::Error TwMatmulV3(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> columns,
                      ffi::Buffer<ffi::S32> row_offsets, ffi::Buffer<ffi::S32> rows,
                      ffi::AnyBuffer values, ffi::Buffer<ffi::S32> residue_rows,
                      ffi::Buffer<ffi::S32> residue_cols, ffi::AnyBuffer residue_values,
                      ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y, int64_t n,
                      int64_t tile_size, int64_t activation) {
  if (bias.element_count() != 0 && bias.element_count() != n)
    return ffi::Error::InvalidArgument("tw_matmul: bias must have n or 0 values");
  return TwMatmul(pool, x, columns, row_offsets, rows, values, residue_rows, residue_cols,
                  residue_values, bias.element_count() ? bias.typed_data() : nullptr, *y, n,
                  tile_size, activation);
}

ffi::Error TwMatmulV2(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::S32> columns,
                      ffi::Buffer<ffi::S32> row_offsets, ffi::Buffer<ffi::S32> rows,
                      ffi::AnyBuffer values, ffi::Buffer<ffi::S32> residue_rows,
                      ffi::Buffer<ffi::S32> residue_cols, ffi::AnyBuffer residue_values,
                      ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y, int64_t n,
                      int64_t tile_size) {
  return TwMatmulV3(pool, x, columns, row_offsets, rows, values, residue_rows, residue_cols,
                    residue_values, bias, y, n, tile_size, 0);
}

}  // namespace
}  // namespace jax_tw

#define JAX_TW_TILE_ARGS                    \
  .Ctx<ffi::ThreadPool>()                   \
      .Arg<ffi::AnyBuffer>()        /* x (M, K) */            \
      .Arg<ffi::Buffer<ffi::S32>>() /* columns (C,) */        \
      .Arg<ffi::Buffer<ffi::S32>>() /* row_offsets (T + 1,) */ \
      .Arg<ffi::Buffer<ffi::S32>>() /* rows (R,) */           \
      .Arg<ffi::AnyBuffer>()        /* values (R, G) */       \
      .Arg<ffi::Buffer<ffi::S32>>() /* residue_rows (E,) */   \
      .Arg<ffi::Buffer<ffi::S32>>() /* residue_cols (E,) */   \
      .Arg<ffi::AnyBuffer>()        /* residue_values (E,) */

// Target jax_tw_tw_matmul_cpu_v3: x, columns, row_offsets, rows, values, residue_rows,
// residue_cols, residue_values, bias (f32, N or 0 values) -> y (M, N) in f32 or x's dtype;
// attributes n, tile_size, activation (int64; Activation in tw_kernel.h, applied after the bias).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxTwTwMatmulCpuV3, jax_tw::TwMatmulV3,
    ffi::Ffi::Bind() JAX_TW_TILE_ARGS
        .Arg<ffi::Buffer<ffi::F32>>()  // bias (N,) or (0,)
        .Ret<ffi::AnyBuffer>()         // y (M, N)
        .Attr<int64_t>("n")
        .Attr<int64_t>("tile_size")
        .Attr<int64_t>("activation"));

// Target jax_tw_tw_matmul_cpu_v2 (kept for modules exported before v3): v3 without activation.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxTwTwMatmulCpuV2, jax_tw::TwMatmulV2,
    ffi::Ffi::Bind() JAX_TW_TILE_ARGS
        .Arg<ffi::Buffer<ffi::F32>>()  // bias (N,) or (0,)
        .Ret<ffi::AnyBuffer>()         // y (M, N)
        .Attr<int64_t>("n")
        .Attr<int64_t>("tile_size"));

// Target jax_tw_tw_matmul_cpu_v1 (kept for modules exported before v2): the same without bias,
// y always f32.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxTwTwMatmulCpu, jax_tw::TwMatmulV1,
    ffi::Ffi::Bind() JAX_TW_TILE_ARGS
        .Ret<ffi::AnyBuffer>()  // y (M, N) f32
        .Attr<int64_t>("n")
        .Attr<int64_t>("tile_size"));

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "jax_tw host kernels (XLA FFI custom-call targets)";
  m.def("registrations", [] {
    pybind11::dict d;
    d["jax_tw_tw_matmul_cpu_v1"] =
        pybind11::capsule(reinterpret_cast<void*>(JaxTwTwMatmulCpu));
    d["jax_tw_tw_matmul_cpu_v2"] =
        pybind11::capsule(reinterpret_cast<void*>(JaxTwTwMatmulCpuV2));
    d["jax_tw_tw_matmul_cpu_v3"] =
        pybind11::capsule(reinterpret_cast<void*>(JaxTwTwMatmulCpuV3));
    return d;
  });
  m.def("isa", [] { return std::string(jax_tw::kKernel.isa); },
        "The instruction set the tile micro-kernel was dispatched to.");
  m.attr("DIRECT_WEIGHTS_PER_K") = jax_tw::kDirectWeightsPerK;
  m.def("x_in_place", &jax_tw::XInPlace, pybind11::arg("k"), pybind11::arg("kept"),
        "Whether a many-rows f32 call with `kept` tile weights over K = k reads x in place.");
}
