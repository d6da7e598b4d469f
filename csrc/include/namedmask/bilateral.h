#pragma once
// Per-element rules of the fast bilateral solver (Barron & Poole 2016), shared by the CPU and
// CUDA kernels so they cannot drift from each other or from namedmask/ops/reference.py:
// RGB -> YUV, the 5-D vertex of a pixel, its 64-bit grid key, the key of a blur neighbour,
// and the blur weights.
//
// Vertex coordinates are floor(x/σs), floor(y/σs), floor(Y/σl), floor(U/σc), floor(V/σc).
// YUV is computed in exact integer arithmetic (coefficients x 1e6) and then divided twice in
// double precision, each division correctly rounded. Every backend (C++, CUDA, torch) does
// exactly these operations, so pixels on a cell boundary land in the same vertex everywhere
// (a fused multiply-add in a float formula would move them).
//
// Keys are mixed-radix integers over (image, y, x, Y, U, V) with every coordinate shifted by
// +1 and each radix = its extent + 2, so the key of the -1/+1 neighbour along a dimension is
// key -/+ stride[d] and never aliases another vertex (the base-255 hash of the published code
// breaks for images wider than 255 σs). The Python wrapper checks that the batch fits in 63 bits.
#include <cmath>
#include <vector>

#include "namedmask/common.h"

namespace namedmask {
namespace bilateral {

constexpr int kDims = 5;                     // x, y, luma, chroma U, chroma V
constexpr int kNeighbours = 2 * kDims;       // -1 and +1 along each dimension
constexpr double kCenterWeight = 2.0 * kDims;  // [1 2 1] per dimension: 2 per dimension on the centre
constexpr double kNeighbourWeight = 1.0;
constexpr int64_t kMaxLumaE6 = 255000000;    // the largest Y, times 1e6 (white)
constexpr int64_t kMaxChromaE6 = 255500000;  // the largest U or V, times 1e6 (pure blue / red)
constexpr double kDiagMin = 1e-5;            // floor of the Jacobi preconditioner's diagonal (as published)
constexpr int kBistochasticSteps = 10;       // as published

// YUV (BT.601, offsets 0/128/128) of an RGB pixel, times 1e6, exact in int64.
NM_HD void yuv_e6(int64_t r, int64_t g, int64_t b, int64_t out[3]) {
  out[0] = 299000 * r + 587000 * g + 114000 * b;
  out[1] = -168736 * r - 331264 * g + 500000 * b + 128000000;
  out[2] = 500000 * r - 418688 * g - 81312 * b + 128000000;
}

// floor(value / sigma) for value >= 0, with value given times 1e6 (see the header comment).
NM_HD int64_t scaled_cell(int64_t value_e6, double sigma) {
  const double v = static_cast<double>(value_e6) / 1e6;
  return static_cast<int64_t>(v / sigma);  // truncation == floor: v >= 0
}

NM_HD int64_t spatial_cell(int64_t pos, double sigma_spatial) {
  return static_cast<int64_t>(static_cast<double>(pos) / sigma_spatial);
}

#if !defined(__CUDA_ARCH__)
// Host fast path of scaled_cell(value_e6, sigma) for 0 <= value_e6 <= max_e6, for the per-pixel
// loop of the CPU backend: the range is cut into buckets of 2^shift values, fewer than a cell
// holds, so a bucket contains at most one cell boundary; each bucket stores its first cell and
// where that boundary falls. Built by bisection over scaled_cell itself, so bit-identical to it.
class CellLookup {
 public:
  struct Bucket {
    int64_t first;     // cell of the bucket's first value
    int64_t boundary;  // offset in the bucket of the next cell's first value (2^shift: none)
  };

  // The lookup as a small value for a hot loop to keep in registers (members are reloaded after
  // every store that might alias them).
  struct View {
    const Bucket* buckets;  // null: sigma is too small for a table, divide
    int shift;
    int64_t mask;
    double sigma;
    int64_t operator()(int64_t value_e6) const {
      if (!buckets) return scaled_cell(value_e6, sigma);
      const Bucket& k = buckets[value_e6 >> shift];
      return k.first + ((value_e6 & mask) >= k.boundary);
    }
  };

  static constexpr int64_t kMaxBuckets = 4096;  // sigma >= ~0.13 (colour sigmas are 4-16 in practice)

  CellLookup(double sigma, int64_t max_e6) : sigma_(sigma) {
    // Cells span sigma * 1e6 values, give or take one from rounding.
    while (shift_ < 40 && static_cast<double>(int64_t{2} << shift_) <= sigma * 1e6 - 2.0) ++shift_;
    if ((max_e6 >> shift_) + 1 > kMaxBuckets) return;  // a table would be large and slow to build
    const int64_t size = int64_t{1} << shift_;
    buckets_.resize((max_e6 >> shift_) + 1);
    for (size_t j = 0; j < buckets_.size(); ++j) {
      const int64_t lo = static_cast<int64_t>(j) << shift_;
      const int64_t first = scaled_cell(lo, sigma);
      int64_t a = lo, b = lo + size;  // the first value of the next cell lies in (a, b]; b = none
      while (b - a > 1) {
        const int64_t mid = a + (b - a) / 2;
        if (scaled_cell(mid, sigma) > first) b = mid; else a = mid;
      }
      buckets_[j] = {first, b - lo};
    }
  }

  View view() const {
    return {buckets_.empty() ? nullptr : buckets_.data(), shift_, (int64_t{1} << shift_) - 1, sigma_};
  }
  int64_t operator()(int64_t value_e6) const { return view()(value_e6); }

 private:
  double sigma_;
  int shift_ = 0;
  std::vector<Bucket> buckets_;
};
#endif

// The grid layout of one batch: strides of the mixed-radix key (image is the most significant
// digit, so sorted keys group vertices by image).
struct GridLayout {
  double sigma_spatial, sigma_luma, sigma_chroma;
  int64_t stride[kDims];  // key stride of x, y, luma, U, V
  int64_t image_stride;   // key stride of the image index
};

// Radices (extents + 2) of x, y, luma, U, V for images up to max_h x max_w.
NM_HD void grid_radices(int64_t max_h, int64_t max_w, double ss, double sl, double sc, int64_t radix[kDims]) {
  radix[0] = spatial_cell(max_w - 1, ss) + 3;
  radix[1] = spatial_cell(max_h - 1, ss) + 3;
  radix[2] = scaled_cell(kMaxLumaE6, sl) + 3;
  radix[3] = scaled_cell(kMaxChromaE6, sc) + 3;
  radix[4] = radix[3];
}

// Key order (least significant first): V, U, luma, x, y, image.
NM_HD GridLayout make_layout(int64_t max_h, int64_t max_w, double ss, double sl, double sc) {
  GridLayout g{ss, sl, sc, {0, 0, 0, 0, 0}, 0};
  int64_t radix[kDims];
  grid_radices(max_h, max_w, ss, sl, sc, radix);
  g.stride[4] = 1;
  g.stride[3] = radix[4];
  g.stride[2] = g.stride[3] * radix[3];
  g.stride[0] = g.stride[2] * radix[2];
  g.stride[1] = g.stride[0] * radix[0];
  g.image_stride = g.stride[1] * radix[1];
  return g;
}

// Grid key of the vertex with cells (x, y, luma, U, V) in image `image`.
NM_HD int64_t pack_key(const GridLayout& g, int64_t image, const int64_t cell[kDims]) {
  int64_t key = image * g.image_stride;
  for (int d = 0; d < kDims; ++d) key += (cell[d] + 1) * g.stride[d];
  return key;
}

// Grid key of pixel (x, y) with colour (r, g, b) of image `image`.
NM_HD int64_t vertex_key(const GridLayout& g, int64_t image, int64_t x, int64_t y, uint8_t r, uint8_t gr,
                         uint8_t b) {
  int64_t yuv[3];
  yuv_e6(r, gr, b, yuv);
  const int64_t cell[kDims] = {spatial_cell(x, g.sigma_spatial), spatial_cell(y, g.sigma_spatial),
                               scaled_cell(yuv[0], g.sigma_luma), scaled_cell(yuv[1], g.sigma_chroma),
                               scaled_cell(yuv[2], g.sigma_chroma)};
  return pack_key(g, image, cell);
}

// Key of neighbour k in [0, kNeighbours): -1 along dimension k/2 for even k, +1 for odd k.
NM_HD int64_t neighbour_key(const GridLayout& g, int64_t key, int k) {
  return (k & 1) ? key + g.stride[k >> 1] : key - g.stride[k >> 1];
}

// Neighbour lists in two layouts with the same meaning, both kNeighbours slots per vertex, slot k
// = neighbour k. Padded: a missing neighbour is -1 (coalesced on the GPU, no scan to build).
// Sentinel (CPU): a missing neighbour is V, an extra entry that every gathered vector holds as 0,
// so the blur is a fixed 10-term sum without branches (a variable-length list costs mispredicted
// branches: measured 2x slower blur on photos; a compressed list sorted by length, predictable,
// measured no faster than the sentinel's 10 loads).
struct PaddedNeighbours {
  const int32_t* index;  // [V * kNeighbours]
  template <typename F>
  NM_HD void for_each(int64_t i, F&& f) const {
    for (int k = 0; k < kNeighbours; ++k) {
      const int32_t j = index[i * kNeighbours + k];
      if (j >= 0) f(j);
    }
  }
};

struct SentinelNeighbours {
  const int32_t* index;  // [V * kNeighbours], V = no neighbour
  template <typename F>
  NM_HD void for_each(int64_t i, F&& f) const {
    for (int k = 0; k < kNeighbours; ++k) f(index[i * kNeighbours + k]);
  }
};

// (B x)_i = kCenterWeight x_i + kNeighbourWeight * (sum of x_j over the existing neighbours).
template <typename Neighbours, typename F>
NM_HD double blur_at(const Neighbours& nbr, int64_t i, F&& x) {
  double acc = 0.0;
  nbr.for_each(i, [&](int32_t j) { acc += x(j); });
  return kCenterWeight * x(i) + kNeighbourWeight * acc;
}

// diag(A) at vertex i, A = lam (Dm - Dn B Dn) + diag(w): B has kCenterWeight on its diagonal.
NM_HD double a_diagonal(double m, double n, double w, double lam) { return lam * (m - kCenterWeight * n * n) + w; }

// Row i of A p, given np = n * p (precomputed once per CG step so the blur gathers one value per
// neighbour): (A p)_i = diag_i p_i - (lam n_i) * (sum of np_j over the neighbours), with
// diag_i = a_diagonal(...). The CPU keeps diag and lam n per vertex; CUDA computes them in place.
template <typename Neighbours>
NM_HD double apply_a_factored(const Neighbours& nbr, double diag, double lam_n, double p_i, const double* np,
                              int64_t i) {
  double acc = 0.0;
  nbr.for_each(i, [&](int32_t j) { acc += np[j]; });
  return diag * p_i - lam_n * (kNeighbourWeight * acc);
}

// Jacobi preconditioner: 1 / max(diag(A), kDiagMin).
NM_HD double inverse_diagonal(double m, double n, double w, double lam) {
  const double d = a_diagonal(m, n, w, lam);
  return 1.0 / (d > kDiagMin ? d : kDiagMin);
}

// One bistochastization step: n <- sqrt(n m / (B n)).
NM_HD double bistochastic_step(double n, double m, double bn) {
  return sqrt(n * m / bn);  // bn >= kCenterWeight n > 0
}

}  // namespace bilateral
}  // namespace namedmask
