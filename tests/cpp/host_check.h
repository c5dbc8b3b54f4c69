// CHECK and the exit report of the host check programs (tests/cpp/*_check.cpp), which
// tests/conftest.py's run_host_check compiles and runs: the first failures are printed, and the
// program prints "ok" and exits 0 only when none failed.
#pragma once
#include <cstdio>

static int failures = 0;
#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (!(cond)) {                                                  \
      if (failures++ < 10) {                                        \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                   \
        std::printf("\n");                                          \
      }                                                             \
    }                                                               \
  } while (0)

static int check_report() {
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
