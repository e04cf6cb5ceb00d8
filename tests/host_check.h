// CHECK for the host-side checks of the CUDA kernels (tests/cuda_*_check.cu): prints the first
// ten failures and counts all of them in `failures`.
#pragma once

#include <cstdio>

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
