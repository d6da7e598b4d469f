// CPU backend of namedmask::bilateral_solve (spec: namedmask/ops/reference.py). Per image:
// grid keys per pixel (parallel over rows), unique vertices through an open-addressing hash table (with a
// last-key cache: neighbouring pixels mostly share a vertex) that also splats as it goes,
// neighbour indices by key lookup (SentinelNeighbours: a missing one points at a zero entry),
// bistochastization, Jacobi-preconditioned CG (scipy's iteration, all buffers allocated once per
// image), slice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <vector>

#include "namedmask/bilateral.h"
#include "namedmask/bilateral_batch.h"

namespace namedmask {
namespace {

using namespace bilateral;

// Loops run on torch's intra-op pool (at::parallel_for), the pool torch's own ops use, so two
// OpenMP runtimes never fight over the cores. Below these sizes a loop runs inline: a 500x375
// image (187k pixels, 10k-80k vertices) takes a few ms on one core, and a fork/join costs more
// than it saves there (measured: 9 ms on one thread vs 58 ms on two on a shared 2-core machine,
// where every barrier waits for a descheduled thread). Multi-megapixel images do go parallel.
constexpr int64_t kVertexGrain = 1 << 18;
constexpr int64_t kPixelGrain = 1 << 20;

template <typename F>
void for_vertices(int64_t nv, F&& f) {
  at::parallel_for(0, nv, kVertexGrain, [&](int64_t begin, int64_t end) {
    for (int64_t v = begin; v < end; ++v) f(v);
  });
}

// Sums of N per-vertex values, f(v, acc) adding vertex v's to acc.
template <int N, typename F>
std::array<double, N> sum_vertices(int64_t nv, F&& f) {
  using Sums = std::array<double, N>;
  return at::parallel_reduce(
      0, nv, kVertexGrain, Sums{},
      [&](int64_t begin, int64_t end, Sums acc) {
        for (int64_t v = begin; v < end; ++v) f(v, acc);
        return acc;
      },
      [](Sums a, const Sums& b) {
        for (int k = 0; k < N; ++k) a[k] += b[k];
        return a;
      });
}

// scaled_cell(value_e6, sigma) without two divisions per pixel: a reciprocal guess corrected
// against the exact first value of each cell, found once by bisection over scaled_cell itself,
// so the answer is bit-identical to scaled_cell (and to the CUDA and torch backends).
class CellTable {
 public:
  CellTable(double sigma, int64_t max_e6) : sigma_(sigma), last_(scaled_cell(max_e6, sigma)) {
    first_.resize(last_ + 2);
    for (int64_t k = 0; k <= last_ + 1; ++k) {
      int64_t lo = 0, hi = max_e6 + 1;  // first v in [lo, hi] with cell(v) >= k; hi = none
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (scaled_cell(mid, sigma) >= k) hi = mid; else lo = mid + 1;
      }
      first_[k] = lo;
    }
    inverse_ = 1.0 / (sigma * 1e6);
  }

  int64_t operator()(int64_t value_e6) const {
    int64_t k = std::clamp<int64_t>(static_cast<int64_t>(static_cast<double>(value_e6) * inverse_), 0, last_);
    while (k < last_ && value_e6 >= first_[k + 1]) ++k;
    while (k > 0 && value_e6 < first_[k]) --k;
    return k;
  }

 private:
  double sigma_, inverse_ = 0.0;
  int64_t last_;
  std::vector<int64_t> first_;
};

// key -> vertex index; keys are > 0 (coordinates are shifted by +1), 0 marks an empty slot.
class VertexTable {
 public:
  explicit VertexTable(int64_t expected) { rehash(std::max<int64_t>(1024, 2 * expected)); }

  // Index of `key`, inserting it as vertex `size()` when new.
  int32_t insert(int64_t key) {
    if (2 * (count_ + 1) > static_cast<int64_t>(slots_.size())) rehash(2 * slots_.size());
    Slot& slot = slots_[probe(key)];
    if (slot.key == 0) slot = {key, static_cast<int32_t>(count_++)};
    return slot.value;
  }

  int32_t find(int64_t key) const {
    const Slot& slot = slots_[probe(key)];
    return slot.key == key ? slot.value : -1;
  }

  int64_t size() const { return count_; }

 private:
  struct Slot {
    int64_t key = 0;
    int32_t value = -1;
  };

  size_t probe(int64_t key) const {
    const uint64_t h = static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull;  // Fibonacci hashing: top bits
    size_t slot = static_cast<size_t>(h >> shift_);
    while (slots_[slot].key != 0 && slots_[slot].key != key) slot = (slot + 1) & mask_;
    return slot;
  }

  void rehash(size_t capacity) {
    size_t cap = 1;
    while (cap < capacity) cap <<= 1;
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(cap, Slot{});
    mask_ = cap - 1;
    shift_ = 64 - std::countr_zero(cap);
    for (const Slot& s : old)
      if (s.key != 0) slots_[probe(s.key)] = s;
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
  int64_t count_ = 0;
};

// Solves one image of h x w pixels; writes the soft output to out[h * w].
void solve_image(const GridLayout& layout, const uint8_t* rgb, const float* target, const float* confidence, int64_t h,
                 int64_t w, double lam, int64_t max_iter, double tol, float* out) {
  const int64_t pixels = h * w;
  const CellTable luma(layout.sigma_luma, 255000000), chroma(layout.sigma_chroma, 255500000);
  // pack_key is linear in the cells: key = row part + column part + colour part, with the
  // strides in locals (stores to pixel_key could otherwise alias them and force reloads).
  const int64_t luma_stride = layout.stride[2], u_stride = layout.stride[3], v_stride = layout.stride[4];
  std::vector<int64_t> column_part(w);
  for (int64_t x = 0; x < w; ++x) {
    const int64_t cell[kDims] = {spatial_cell(x, layout.sigma_spatial), -1, -1, -1, -1};
    column_part[x] = pack_key(layout, 0, cell);
  }
  std::vector<int64_t> pixel_key(pixels);
  at::parallel_for(0, h, std::max<int64_t>(1, kPixelGrain / w), [&](int64_t row_begin, int64_t row_end) {
    const int64_t* columns = column_part.data();
    for (int64_t y = row_begin; y < row_end; ++y) {
      const int64_t row_cell[kDims] = {-1, spatial_cell(y, layout.sigma_spatial), 0, 0, 0};
      const int64_t row_part = pack_key(layout, 0, row_cell);
      const uint8_t* c = rgb + 3 * y * w;
      int64_t* __restrict keys = pixel_key.data() + y * w;
      for (int64_t x = 0; x < w; ++x, c += 3) {
        int64_t yuv[3];
        yuv_e6(c[0], c[1], c[2], yuv);
        keys[x] = row_part + columns[x] + luma(yuv[0]) * luma_stride + chroma(yuv[1]) * u_stride +
                  chroma(yuv[2]) * v_stride;
      }
    }
  });

  // Unique vertices in first-seen order, splatting 1, c and c*t on the way.
  VertexTable table(pixels / 16);
  std::vector<int32_t> vertex_of_pixel(pixels);
  std::vector<int64_t> vertex_key_of;
  std::vector<double> m, wsplat, b;
  int64_t last_key = 0;
  int32_t last_vertex = -1;
  for (int64_t i = 0; i < pixels; ++i) {
    int32_t v = last_vertex;
    if (pixel_key[i] != last_key) {
      // Most pixels share the vertex of the pixel to the left or above; only the rest probe.
      v = (i >= w && pixel_key[i - w] == pixel_key[i]) ? vertex_of_pixel[i - w] : table.insert(pixel_key[i]);
      if (v == static_cast<int32_t>(m.size())) {
        vertex_key_of.push_back(pixel_key[i]);
        m.push_back(0.0), wsplat.push_back(0.0), b.push_back(0.0);
      }
      last_key = pixel_key[i], last_vertex = v;
    }
    vertex_of_pixel[i] = v;
    m[v] += 1.0;
    wsplat[v] += static_cast<double>(confidence[i]);
    b[v] += static_cast<double>(confidence[i]) * static_cast<double>(target[i]);
  }
  const int64_t nv = table.size();

  // Neighbours are symmetric: look up only +1 along each dimension (odd k) and fill in the
  // -1 entry (k - 1) of the vertex found. Each entry has exactly one writer.
  std::vector<int32_t> nbr(nv * kNeighbours, static_cast<int32_t>(nv));
  for_vertices(nv, [&](int64_t v) {
    for (int k = 1; k < kNeighbours; k += 2) {
      const int32_t u = table.find(neighbour_key(layout, vertex_key_of[v], k));
      if (u >= 0) nbr[v * kNeighbours + k] = u, nbr[int64_t(u) * kNeighbours + k - 1] = static_cast<int32_t>(v);
    }
  });
  const SentinelNeighbours neighbours{nbr.data()};

  // Bistochastization.
  std::vector<double> n(nv + 1, 1.0), scratch(nv + 1, 0.0);  // [nv]: the sentinel
  n[nv] = 0.0;
  auto blur_n = [&](int64_t v) { return blur_at(neighbours, v, [&](int64_t j) { return n[j]; }); };
  for (int it = 0; it < kBistochasticSteps; ++it) {
    for_vertices(nv, [&](int64_t v) { scratch[v] = bistochastic_step(n[v], m[v], blur_n(v)); });
    std::swap(n, scratch);
  }
  for_vertices(nv, [&](int64_t v) { m[v] = n[v] * blur_n(v); });

  // scipy.sparse.linalg.cg from y0 = b / w; np holds n * (the vector A is applied to).
  std::vector<double> y(nv), r(nv), z(nv), p(nv), q(nv), np(nv + 1, 0.0), inv_diag(nv);  // np[nv]: the sentinel
  const double b_norm = std::sqrt(sum_vertices<1>(nv, [&](int64_t v, std::array<double, 1>& acc) {
    y[v] = wsplat[v] > 0 ? b[v] / wsplat[v] : 0.0;
    np[v] = n[v] * y[v];
    inv_diag[v] = inverse_diagonal(m[v], n[v], wsplat[v], lam);
    acc[0] += b[v] * b[v];
  })[0]);
  if (b_norm == 0.0) {
    std::fill(out, out + pixels, 0.0f);
    return;
  }
  const double atol = tol * b_norm;
  const double *pm = m.data(), *pn = n.data(), *pw = wsplat.data(), *pnp = np.data();
  for_vertices(nv, [&](int64_t v) { r[v] = b[v] - apply_a_at(neighbours, pm, pn, pw, y.data(), pnp, lam, v); });
  // z = M r with r.r and r.z, fused into the update of y and r after the first time.
  auto precondition = [&](int64_t v, std::array<double, 2>& acc) {
    z[v] = r[v] * inv_diag[v];
    acc[0] += r[v] * r[v];
    acc[1] += r[v] * z[v];
  };
  std::array<double, 2> sums = sum_vertices<2>(nv, precondition);
  double rr = sums[0], rho = sums[1], rho_prev = 0.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    if (std::sqrt(rr) < atol) break;  // scipy's test, before every iteration
    const double beta = it == 0 ? 0.0 : rho / rho_prev;
    for_vertices(nv, [&](int64_t v) {
      p[v] = z[v] + beta * p[v];
      np[v] = n[v] * p[v];
    });
    const double pq = sum_vertices<1>(nv, [&](int64_t v, std::array<double, 1>& acc) {
      q[v] = apply_a_at(neighbours, pm, pn, pw, p.data(), pnp, lam, v);
      acc[0] += p[v] * q[v];
    })[0];
    const double alpha = pq != 0.0 ? rho / pq : 0.0;  // pq == 0 only when r == 0 (tol == 0)
    rho_prev = rho;
    sums = sum_vertices<2>(nv, [&](int64_t v, std::array<double, 2>& acc) {
      y[v] += alpha * p[v];
      r[v] -= alpha * q[v];
      precondition(v, acc);
    });
    rr = sums[0], rho = sums[1];
  }

  at::parallel_for(0, pixels, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<float>(y[vertex_of_pixel[i]]);
  });
}

at::Tensor bilateral_solve_cpu(const at::Tensor& image, const at::Tensor& target, const at::Tensor& confidence,
                               const at::Tensor& sizes, double sigma_spatial, double sigma_luma, double sigma_chroma,
                               double lam, int64_t max_iter, double tol) {
  const BilateralBatch batch = check_bilateral_inputs(image, target, confidence, sizes);
  const auto img = image.contiguous();
  const auto t = target.contiguous();
  const auto c = confidence.contiguous();
  auto out = at::empty({batch.pixels()}, target.options());
  const GridLayout layout = make_layout(batch.max_h, batch.max_w, sigma_spatial, sigma_luma, sigma_chroma);
  // Several ordinary-sized images: one image per thread (one fork/join for the whole batch).
  // Large images: one at a time, each parallel inside.
  const bool across_images = batch.size() > 1 && batch.max_h * batch.max_w < kPixelGrain;
  at::parallel_for(0, batch.size(), across_images ? 1 : batch.size(), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t start = batch.pixel_start[i];
      if (batch.height[i] * batch.width[i] > 0)
        solve_image(layout, img.data_ptr<uint8_t>() + 3 * start, t.data_ptr<float>() + start,
                    c.data_ptr<float>() + start, batch.height[i], batch.width[i], lam, max_iter, tol,
                    out.data_ptr<float>() + start);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CPU, m) { m.impl("bilateral_solve", &bilateral_solve_cpu); }

}  // namespace namedmask
