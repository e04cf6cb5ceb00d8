// CHECK for the host-side checks of the CUDA kernels (tests/cuda_*_check.cu): prints the first
// ten failures and counts all of them in `failures`.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "packed_tiles.h"

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

// A random layer's packed indices (n columns, c of them kept in sorted order, tiles of g, depths
// below max_depth, every `every`-th tile from the middle one empty) and its schedule, computed
// here independently of packing.schedule: tiles by depth (deepest first, ties by index); each
// pruned column in the span of the first tile whose last kept column lies after it, else the
// last.
struct RandomLayer {
  int n, c, g, t;
  std::vector<int32_t> columns, offsets, order, pruned, pruned_offsets;

  RandomLayer(std::mt19937& rng, int n_, int c_, int g_, int max_depth, int every)
      : n(n_), c(c_), g(g_), t((c_ + g_ - 1) / g_) {
    std::vector<int32_t> all(n);
    for (int j = 0; j < n; ++j) all[j] = j;
    std::shuffle(all.begin(), all.end(), rng);
    columns.assign(all.begin(), all.begin() + c);
    std::sort(columns.begin(), columns.end());
    offsets.assign(t + 1, 0);
    for (int i = 0; i < t; ++i)
      offsets[i + 1] = offsets[i] + (i % every == every / 2 ? 0 : int(rng() % max_depth));
    order.resize(t);
    for (int i = 0; i < t; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return offsets[a + 1] - offsets[a] > offsets[b + 1] - offsets[b];
    });
    std::vector<char> kept(n, 0);
    for (int32_t col : columns) kept[col] = 1;
    std::vector<std::vector<int32_t>> spans(t);
    for (int j = 0; j < n; ++j) {
      if (kept[j]) continue;
      int owner = t - 1;
      for (int i = 0; i < t; ++i)
        if (columns[std::min((i + 1) * g, c) - 1] > j) { owner = i; break; }
      spans[owner].push_back(j);
    }
    pruned_offsets.assign(1, 0);
    for (auto& span : spans) {
      pruned.insert(pruned.end(), span.begin(), span.end());
      pruned_offsets.push_back(static_cast<int32_t>(pruned.size()));
    }
  }

  // Its view (k large: no row index is read).
  void Fill(jax_tw::PackedTilesView& p) const {
    p.k = 1 << 20; p.n = n; p.g = g; p.c = c; p.t = t; p.r = offsets[t];
    p.np = static_cast<int64_t>(pruned.size());
    p.columns = columns.data(); p.row_offsets = offsets.data(); p.tile_order = order.data();
    p.pruned = pruned.data(); p.pruned_offsets = pruned_offsets.data();
  }
};
