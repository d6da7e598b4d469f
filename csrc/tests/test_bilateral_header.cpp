// Per-element rules of the bilateral solver (namedmask/bilateral.h): exact YUV, cells on
// exact boundaries, key packing and neighbour keys, blur and A rows on a tiny grid.
#include <cmath>
#include <cstdio>

#include "namedmask/bilateral.h"
#include "expect.h"


int main() {
  using namespace namedmask::bilateral;
  int64_t yuv[3];
  yuv_e6(255, 255, 255, yuv);
  EXPECT(yuv[0] == 255000000 && yuv[1] == 128000000 && yuv[2] == 128000000);  // white: no chroma
  yuv_e6(0, 0, 255, yuv);
  EXPECT(yuv[1] == 255500000);  // the largest U
  for (int v = 0; v < 256; ++v) {  // grey levels sit exactly on luma cell boundaries
    yuv_e6(v, v, v, yuv);
    EXPECT(yuv[0] == int64_t(v) * 1000000);
    EXPECT(scaled_cell(yuv[0], 16.0) == v / 16);
  }
  EXPECT(scaled_cell(15999999, 16.0) == 0 && scaled_cell(16000000, 16.0) == 1);
  EXPECT(spatial_cell(4095, 16.0) == 255 && spatial_cell(4096, 16.0) == 256);  // beyond a base-255 hash

  const GridLayout g = make_layout(375, 500, 16.0, 16.0, 8.0);
  int64_t radix[kDims];
  grid_radices(375, 500, 16.0, 16.0, 8.0, radix);
  EXPECT(radix[0] == 499 / 16 + 3 && radix[1] == 374 / 16 + 3 && radix[2] == 255 / 16 + 3 && radix[3] == 31 + 3);
  EXPECT(g.stride[4] == 1 && g.stride[3] == radix[4] && g.image_stride == g.stride[1] * radix[1]);
  const int64_t cells[kDims] = {3, 7, 2, 15, 16};
  const int64_t key = pack_key(g, 2, cells);
  for (int k = 0; k < kNeighbours; ++k) {
    int64_t moved[kDims] = {3, 7, 2, 15, 16};
    moved[k / 2] += (k & 1) ? 1 : -1;
    EXPECT(neighbour_key(g, key, k) == pack_key(g, 2, moved));
  }
  int64_t origin[kDims] = {0, 0, 0, 0, 0};
  EXPECT(neighbour_key(g, pack_key(g, 0, origin), 0) > 0);  // the -1 neighbour of cell 0 is no vertex
  yuv_e6(10, 200, 30, yuv);
  const int64_t pixel[kDims] = {spatial_cell(100, 16.0), spatial_cell(50, 16.0), scaled_cell(yuv[0], 16.0),
                                scaled_cell(yuv[1], 8.0), scaled_cell(yuv[2], 8.0)};
  EXPECT(vertex_key(g, 1, 100, 50, 10, 200, 30) == pack_key(g, 1, pixel));

  // Two vertices, neighbours along x: B = [[10, 1], [1, 10]].
  const int32_t padded[2 * kNeighbours] = {-1, 1, -1, -1, -1, -1, -1, -1, -1, -1,
                                           0, -1, -1, -1, -1, -1, -1, -1, -1, -1};
  const int32_t sentinel[2 * kNeighbours] = {2, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                             0, 2, 2, 2, 2, 2, 2, 2, 2, 2};  // 2 = V: no neighbour
  const PaddedNeighbours nbr{padded};
  const SentinelNeighbours compact{sentinel};
  const double x[3] = {1.0, 2.0, 0.0};  // x[V] = 0
  EXPECT(blur_at(nbr, 0, [&](int64_t j) { return x[j]; }) == 12.0);
  EXPECT(blur_at(nbr, 1, [&](int64_t j) { return x[j]; }) == 21.0);
  EXPECT(blur_at(compact, 0, [&](int64_t j) { return x[j]; }) == 12.0);
  EXPECT(blur_at(compact, 1, [&](int64_t j) { return x[j]; }) == 21.0);
  const double m[2] = {3.0, 4.0}, n[2] = {0.5, 0.25}, w[2] = {1.0, 0.0}, np[3] = {0.5, 0.5, 0.0};
  // Row i of A = lam (Dm - Dn B Dn) + W applied to p = x, with lam = 2.
  auto row = [&](const auto& nbrs, int i) {
    return apply_a_factored(nbrs, a_diagonal(m[i], n[i], w[i], 2.0), 2.0 * n[i], x[i], np, i);
  };
  // row 0: 2 (3 - 0.5 (10 * 0.5 + 0.5)) + 1
  EXPECT(std::fabs(row(nbr, 0) - (2.0 * (3.0 - 0.5 * 5.5) + 1.0)) < 1e-12);
  EXPECT(row(compact, 1) == row(nbr, 1));
  // The factored row equals the unfactored lam (m p - n B(np)) + w p.
  for (int i = 0; i < 2; ++i) {
    const double bnp = blur_at(nbr, i, [&](int64_t j) { return np[j]; });
    EXPECT(std::fabs(row(nbr, i) - (2.0 * (m[i] * x[i] - n[i] * bnp) + w[i] * x[i])) < 1e-12);
  }
  EXPECT(inverse_diagonal(1.0, 1.0, 0.0, 1.0) == 1.0 / kDiagMin);  // clamped like the published code
  EXPECT(std::fabs(bistochastic_step(1.0, 4.0, 16.0) - 0.5) < 1e-15);

  // CellLookup == scaled_cell: every value near each cell boundary and each bucket start, the
  // first 2M values, and a strided sweep of the whole range, for sigmas from 0.05 to 64.
  for (double sigma : {16.0, 8.0, 4.0, 24.0, 3.0, 0.7, 1.3, 0.2, 0.05, 1e-5, 64.0, 6.0}) {  // 0.05, 1e-5: no table
    for (int64_t max_e6 : {int64_t{255000000}, int64_t{255500000}}) {
      const CellLookup cell(sigma, max_e6);
      int64_t mismatches = 0;
      auto check = [&](int64_t v) {
        if (v >= 0 && v <= max_e6 && cell(v) != scaled_cell(v, sigma)) ++mismatches;
      };
      for (int64_t k = 0; k <= scaled_cell(max_e6, sigma) + 1; ++k) {
        const auto boundary = static_cast<int64_t>(k * sigma * 1e6);
        for (int64_t d = -3; d <= 3; ++d) check(boundary + d);
      }
      for (int64_t v = 0; v < 2000000; ++v) check(v);
      for (int64_t v = 0; v <= max_e6; v += 997) check(v);
      for (int64_t s = 1; s < 40; ++s)
        for (int64_t b = 0; (b << s) <= max_e6 && b < 4096; ++b) check(b << s), check((b << s) - 1);
      check(max_e6);
      EXPECT(mismatches == 0);
    }
  }
  return finish("bilateral");
}
