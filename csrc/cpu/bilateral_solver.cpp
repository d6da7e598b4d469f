// CPU backend of namedmask::bilateral_solve (spec: namedmask/ops/reference.py). Per image:
// grid keys per pixel (OpenMP), unique vertices through an open-addressing hash table (with a
// last-key cache: neighbouring pixels mostly share a vertex) that also splats as it goes,
// neighbour indices by key lookup, bistochastization, Jacobi-preconditioned CG (scipy's
// iteration, all buffers allocated once per image), slice.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <vector>

#include "namedmask/bilateral.h"

namespace namedmask {
namespace {

using namespace bilateral;

// Below this many vertices the vertex-space loops run on one thread: an image of 500x375 has
// 10k-80k vertices, and an OpenMP barrier per CG step costs more than it saves there (much more
// on a busy machine, where a barrier waits for a descheduled thread).
constexpr int64_t kParallelVertices = 1 << 18;
constexpr int64_t kParallelPixels = 1 << 16;

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
    if (2 * (count_ + 1) > static_cast<int64_t>(keys_.size())) rehash(2 * keys_.size());
    size_t slot = probe(key);
    if (keys_[slot] == 0) {
      keys_[slot] = key;
      values_[slot] = static_cast<int32_t>(count_++);
    }
    return values_[slot];
  }

  int32_t find(int64_t key) const {
    const size_t slot = probe(key);
    return keys_[slot] == key ? values_[slot] : -1;
  }

  int64_t size() const { return count_; }

 private:
  size_t probe(int64_t key) const {
    const uint64_t h = static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull;  // Fibonacci hashing: top bits
    size_t slot = static_cast<size_t>(h >> shift_);
    while (keys_[slot] != 0 && keys_[slot] != key) slot = (slot + 1) & mask_;
    return slot;
  }

  void rehash(size_t capacity) {
    size_t cap = 1;
    while (cap < capacity) cap <<= 1;
    std::vector<int64_t> old_keys = std::move(keys_);
    std::vector<int32_t> old_values = std::move(values_);
    keys_.assign(cap, 0);
    values_.assign(cap, -1);
    mask_ = cap - 1;
    shift_ = 64 - std::countr_zero(cap);
    for (size_t s = 0; s < old_keys.size(); ++s)
      if (old_keys[s] != 0) {
        const size_t slot = probe(old_keys[s]);
        keys_[slot] = old_keys[s];
        values_[slot] = old_values[s];
      }
  }

  std::vector<int64_t> keys_;
  std::vector<int32_t> values_;
  size_t mask_ = 0;
  int shift_ = 64;
  int64_t count_ = 0;
};

// Solves one image of h x w pixels; writes the soft output to out[h * w].
void solve_image(const GridLayout& layout, const uint8_t* rgb, const float* target, const float* confidence, int64_t h,
                 int64_t w, double lam, int64_t max_iter, double tol, float* out) {
  const int64_t pixels = h * w;
  const CellTable luma(layout.sigma_luma, 255000000), chroma(layout.sigma_chroma, 255500000);
  std::vector<int64_t> column_cell(w);
  for (int64_t x = 0; x < w; ++x) column_cell[x] = spatial_cell(x, layout.sigma_spatial);
  std::vector<int64_t> pixel_key(pixels);
#pragma omp parallel for schedule(static) if (pixels > kParallelPixels)
  for (int64_t y = 0; y < h; ++y) {
    int64_t cell[kDims] = {0, spatial_cell(y, layout.sigma_spatial), 0, 0, 0};
    for (int64_t x = 0; x < w; ++x) {
      const uint8_t* c = rgb + 3 * (y * w + x);
      int64_t yuv[3];
      yuv_e6(c[0], c[1], c[2], yuv);
      cell[0] = column_cell[x], cell[2] = luma(yuv[0]), cell[3] = chroma(yuv[1]), cell[4] = chroma(yuv[2]);
      pixel_key[y * w + x] = pack_key(layout, 0, cell);
    }
  }

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
      v = table.insert(pixel_key[i]);
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
  const bool par = nv > kParallelVertices;

  std::vector<int32_t> nbr(nv * kNeighbours);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t v = 0; v < nv; ++v)
    for (int k = 0; k < kNeighbours; ++k) nbr[v * kNeighbours + k] = table.find(neighbour_key(layout, vertex_key_of[v], k));

  // Bistochastization.
  std::vector<double> n(nv, 1.0), scratch(nv);
  for (int it = 0; it < 10; ++it) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t v = 0; v < nv; ++v) scratch[v] = bistochastic_step(n[v], m[v], blur_at(nbr.data(), v, [&](int64_t j) { return n[j]; }));
    std::swap(n, scratch);
  }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t v = 0; v < nv; ++v) m[v] = n[v] * blur_at(nbr.data(), v, [&](int64_t j) { return n[j]; });

  // scipy.sparse.linalg.cg from y0 = b / w.
  std::vector<double> y(nv), r(nv), z(nv), p(nv), q(nv), inv_diag(nv);
  double b_norm2 = 0.0;
#pragma omp parallel for schedule(static) if (par) reduction(+ : b_norm2)
  for (int64_t v = 0; v < nv; ++v) {
    y[v] = wsplat[v] > 0 ? b[v] / wsplat[v] : 0.0;
    inv_diag[v] = inverse_diagonal(m[v], n[v], wsplat[v], lam);
    b_norm2 += b[v] * b[v];
  }
  const double b_norm = std::sqrt(b_norm2);
  if (b_norm == 0.0) {
    std::fill(out, out + pixels, 0.0f);
    return;
  }
  const double atol = tol * b_norm;
  const double *pm = m.data(), *pn = n.data(), *pw = wsplat.data();
  const int32_t* pnbr = nbr.data();
#pragma omp parallel for schedule(static) if (par)
  for (int64_t v = 0; v < nv; ++v) r[v] = b[v] - apply_a_at(pnbr, pm, pn, pw, y.data(), lam, v);
  double rho_prev = 0.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    double rr = 0.0, rho = 0.0;
#pragma omp parallel for schedule(static) if (par) reduction(+ : rr, rho)
    for (int64_t v = 0; v < nv; ++v) {
      z[v] = r[v] * inv_diag[v];
      rr += r[v] * r[v];
      rho += r[v] * z[v];
    }
    if (std::sqrt(rr) < atol) break;
    const double beta = it == 0 ? 0.0 : rho / rho_prev;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t v = 0; v < nv; ++v) p[v] = z[v] + beta * p[v];
    double pq = 0.0;
#pragma omp parallel for schedule(static) if (par) reduction(+ : pq)
    for (int64_t v = 0; v < nv; ++v) {
      q[v] = apply_a_at(pnbr, pm, pn, pw, p.data(), lam, v);
      pq += p[v] * q[v];
    }
    const double alpha = pq != 0.0 ? rho / pq : 0.0;  // pq == 0 only when r == 0 (tol == 0)
#pragma omp parallel for schedule(static) if (par)
    for (int64_t v = 0; v < nv; ++v) {
      y[v] += alpha * p[v];
      r[v] -= alpha * q[v];
    }
    rho_prev = rho;
  }

#pragma omp parallel for schedule(static) if (pixels > kParallelPixels)
  for (int64_t i = 0; i < pixels; ++i) out[i] = static_cast<float>(y[vertex_of_pixel[i]]);
}

at::Tensor bilateral_solve_cpu(const at::Tensor& image, const at::Tensor& target, const at::Tensor& confidence,
                               const at::Tensor& sizes, double sigma_spatial, double sigma_luma, double sigma_chroma,
                               double lam, int64_t max_iter, double tol) {
  TORCH_CHECK(image.scalar_type() == at::kByte && image.dim() == 2 && image.size(1) == 3,
              "bilateral_solve: image must be uint8 [P, 3]");
  TORCH_CHECK(target.scalar_type() == at::kFloat && confidence.scalar_type() == at::kFloat,
              "bilateral_solve: target and confidence must be float32");
  TORCH_CHECK(target.numel() == image.size(0) && confidence.numel() == image.size(0),
              "bilateral_solve: image, target and confidence must have the same pixel count");
  TORCH_CHECK(sizes.scalar_type() == at::kLong && sizes.dim() == 2 && sizes.size(1) == 2,
              "bilateral_solve: sizes must be int64 [B, 2]");
  const auto img = image.contiguous();
  const auto t = target.contiguous();
  const auto c = confidence.contiguous();
  const auto hw = sizes.cpu().contiguous();
  const int64_t* s = hw.data_ptr<int64_t>();
  const int64_t batch = hw.size(0);
  int64_t max_h = 1, max_w = 1, total = 0;
  for (int64_t i = 0; i < batch; ++i) {
    max_h = std::max(max_h, s[2 * i]), max_w = std::max(max_w, s[2 * i + 1]);
    total += s[2 * i] * s[2 * i + 1];
  }
  TORCH_CHECK(total == image.size(0), "bilateral_solve: sizes describe ", total, " pixels, image has ", image.size(0));
  auto out = at::empty({total}, target.options());
  const GridLayout layout = make_layout(max_h, max_w, sigma_spatial, sigma_luma, sigma_chroma);
  int64_t start = 0;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t h = s[2 * i], w = s[2 * i + 1];
    if (h * w > 0)
      solve_image(layout, img.data_ptr<uint8_t>() + 3 * start, t.data_ptr<float>() + start,
                  c.data_ptr<float>() + start, h, w, lam, max_iter, tol, out.data_ptr<float>() + start);
    start += h * w;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CPU, m) { m.impl("bilateral_solve", &bilateral_solve_cpu); }

}  // namespace namedmask
