#pragma once
// Minimal checks for the torch-free header tests run by ctest.
#include <cstdio>

static int failures = 0;

static void expect_eq(long long got, long long want, int line, const char* file) {
  if (got != want) {
    std::fprintf(stderr, "%s:%d: got %lld, expected %lld\n", file, line, got, want);
    ++failures;
  }
}

static void expect_true(bool ok, const char* what, int line, const char* file) {
  if (!ok) {
    std::fprintf(stderr, "%s:%d: expected %s\n", file, line, what);
    ++failures;
  }
}

// EXPECT_EQ(a, b) works with template arguments containing commas.
#define EXPECT_EQ(...) expect_eq(__VA_ARGS__, __LINE__, __FILE__)
#define EXPECT(cond) expect_true((cond), #cond, __LINE__, __FILE__)

// Prints the verdict and returns main's exit code.
static int finish(const char* name) {
  std::printf("%s: %s\n", name, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
