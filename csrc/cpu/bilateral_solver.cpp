// CPU backend of namedmask::bilateral_solve (spec: namedmask/ops/reference.py). Per image:
//  1. the grid, one spatial cell (a sigma_spatial x sigma_spatial block of pixels) at a time:
//     colour key per pixel, its vertex from a small per-cell table (in L1, unlike one table of
//     64-bit grid keys for the whole image), splatting on the way; then the neighbours of the
//     cell's vertices by lookups in this cell's table (luma, U, V) and of the vertices of the
//     left and upper cells (x, y). No branch depends on the pixel data in the hot loops: in a
//     photo, whether a pixel opens a vertex or a vertex has a neighbour is a coin toss. With
//     several threads, bands of cell rows are built in parallel and renumbered in cell order.
//  2. bistochastization, 3. preconditioned CG (all buffers allocated once per image), 4. slice;
//     their loops run in fixed chunks, so the output has the same bits for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <memory>
#include <vector>

#include "namedmask/bilateral.h"
#include "namedmask/bilateral_batch.h"
#include "share_tasks.h"

namespace namedmask {
namespace {

using namespace bilateral;

// Threads (see share_tasks.h): helpers only where a task is long and a late one cannot hold up
// the rest. Measured on this 2-core machine with other processes running: a photo's grid
// (~10k vertices) takes tens of us per CG pass, less than waking a thread; sharing a 500x375
// photo's bands, or the photos of a 4-photo batch, made calls 2-5x slower than 1 thread (the
// caller ends up waiting for a descheduled helper's last task). So: an image is split only
// from kSplitPixels pixels (bands of kBandPixels, CG chunks of kVertexChunk vertices once a
// helper gets kSplitVertices of them), and a batch of smaller images is shared one image per
// task only when each worker gets kImagesPerWorker images. An image's loops run in fixed chunks
// whose sums are added in chunk order: the output bits do not depend on the threads.
constexpr int64_t kVertexChunk = 1024;
constexpr int64_t kSplitVertices = 1 << 17;
constexpr int64_t kSplitPixels = 1 << 20;
constexpr int64_t kBandPixels = 1 << 16;
constexpr int64_t kPixelGrain = 1 << 16;  // slicing chunk
constexpr int64_t kImagesPerWorker = 8;
// On cores idle at the time of the call (idle_helpers_for), smaller work is shared too: a
// photo's grid bands and slicing from kIdleSplitPixels per worker, its bistochastization and CG
// from kIdleSplitVertices per worker (a SpinningTeam: woken once, the helpers spin between the
// regions, two per CG iteration, which are too short to wake a thread for), and the photos of a
// batch one per task.
constexpr int64_t kIdleSplitPixels = 1 << 16;
constexpr int64_t kIdleSplitVertices = 1 << 11;

template <typename F>
void for_vertices(int64_t nv, SpinningTeam& team, F&& f) {
  team.share((nv + kVertexChunk - 1) / kVertexChunk, [&](int64_t c, int) {
    for (int64_t v = c * kVertexChunk, end = std::min(nv, v + kVertexChunk); v < end; ++v) f(v);
  });
}

// Sums of N values over the vertices, chunk(begin, end) returning those of [begin, end).
template <int N, typename F>
std::array<double, N> sum_chunks(int64_t nv, SpinningTeam& team, F&& chunk) {
  const int64_t chunks = (nv + kVertexChunk - 1) / kVertexChunk;
  std::vector<std::array<double, N>> partial(chunks);
  team.share(chunks, [&](int64_t c, int) {
    partial[c] = chunk(c * kVertexChunk, std::min(nv, (c + 1) * kVertexChunk));
  });
  std::array<double, N> sum{};
  for (const auto& p : partial)
    for (int k = 0; k < N; ++k) sum[k] += p[k];
  return sum;
}

// Sums of N per-vertex values, f(v, acc) adding vertex v's to acc.
template <int N, typename F>
std::array<double, N> sum_vertices(int64_t nv, SpinningTeam& team, F&& f) {
  return sum_chunks<N>(nv, team, [&](int64_t begin, int64_t end) {
    std::array<double, N> acc{};
    for (int64_t v = begin; v < end; ++v) f(v, acc);
    return acc;
  });
}

// Colour key -> vertex within one spatial cell: open addressing, sized once to stay at most half
// full for the largest cell, and a stamp per slot that empties the table for the next cell without
// touching it. Colour keys are the colour part of the grid key, so a colour neighbour is key + stride.
class CellVertexTable {
  struct Slot {
    int64_t key = 0;
    int32_t stamp = -1;
    int32_t vertex = -1;
  };

 public:
  explicit CellVertexTable(int64_t max_cell_vertices)
      : slots_(std::bit_ceil(static_cast<uint64_t>(std::max<int64_t>(64, 2 * max_cell_vertices)))) {}

  // The (empty) table of the next cell, as a small value for the pixel loop to keep in registers.
  class Cell {
   public:
    // The vertex of `key` in this cell; a new key gets `fresh` and sets *added (no branch on it:
    // in a photo, whether a pixel opens a vertex is a coin toss the branch predictor loses).
    int32_t find_or_add(int64_t key, int32_t fresh, bool* added) const {
      Slot& slot = slots_[probe(key)];
      *added = slot.stamp != stamp_;
      const int32_t v = *added ? fresh : slot.vertex;
      slot = {key, stamp_, v};
      return v;
    }

    int32_t find(int64_t key) const {
      const Slot& slot = slots_[probe(key)];
      return slot.stamp == stamp_ ? slot.vertex : -1;
    }

   private:
    friend class CellVertexTable;
    Cell(Slot* slots, size_t size, int32_t stamp)
        : slots_(slots), mask_(size - 1), shift_(64 - std::countr_zero(size)), stamp_(stamp) {}

    size_t probe(int64_t key) const {
      size_t slot = static_cast<size_t>((static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> shift_);
      while (slots_[slot].stamp == stamp_ && slots_[slot].key != key) slot = (slot + 1) & mask_;
      return slot;
    }

    Slot* slots_;
    size_t mask_;
    int shift_;
    int32_t stamp_;
  };

  Cell next_cell() { return Cell(slots_.data(), slots_.size(), ++stamp_); }

 private:
  std::vector<Slot> slots_;
  int32_t stamp_ = 0;
};

// First index of each run of equal spatial cells along an axis of `size` pixels, plus `size`.
std::vector<int64_t> cell_starts(int64_t size, double sigma_spatial) {
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < size; ++i)
    if (i == 0 || spatial_cell(i, sigma_spatial) != spatial_cell(i - 1, sigma_spatial)) starts.push_back(i);
  starts.push_back(size);
  return starts;
}

// Whether run k's cell is the +1 neighbour of run k - 1's: always for sigma_spatial >= 1; below 1
// a step of one pixel skips cells.
bool adjacent_runs(const std::vector<int64_t>& starts, int64_t k, double sigma_spatial) {
  return spatial_cell(starts[k], sigma_spatial) == spatial_cell(starts[k - 1], sigma_spatial) + 1;
}

int64_t longest_run(const std::vector<int64_t>& starts) {
  int64_t run = 0;
  for (size_t i = 1; i < starts.size(); ++i) run = std::max(run, starts[i] - starts[i - 1]);
  return run;
}

// Grows v to at least `size` elements, value-initialised, doubling so that growth is amortised.
template <typename T>
void grow(std::vector<T>& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(std::max<size_t>(size, 2 * v.size()));
}

// The bilateral grid of one image, or of a band of its cell rows while building: each vertex's
// neighbours, splatted sums (of 1, of the confidence c and of c * target) and colour key. (Each
// pixel's vertex goes to a separate array.)
struct Grid {
  int64_t vertices = 0;
  std::vector<int32_t> neighbours;  // kNeighbours slots per vertex; -1 = none while building
  std::vector<double> m, w, b;
  std::vector<int64_t> colour_of;
  std::vector<int32_t> first_vertex;  // bands: vertices of cell c are [first_vertex[c], first_vertex[c + 1])
};

// The colour cells of luma and chroma values, built once per call (the sigmas are the batch's).
struct ColourCells {
  CellLookup luma, chroma;
};

// What every band shares: the image, the colour tables and the cell layout.
struct GridInput {
  const GridLayout& layout;
  const uint8_t* rgb;
  const float *target, *confidence;
  int64_t confidence_stride, width;  // confidence[i * confidence_stride]: stride 0 for a uniform value
  const CellLookup &luma, &chroma;
  std::vector<int64_t> columns, rows;  // cell_starts of the columns and rows
  int64_t cells_x;
  int64_t max_cell_vertices;  // at most a cell's pixels, and at most the colour keys there are
  int64_t max_vertices;       // the grid may hold at most this many (memory bound; see the op doc)
  std::atomic<int64_t>* vertices_so_far;  // over all bands of the image
};

// Thrown (from any band) when the image's grid would exceed max_vertices; solve_image turns it
// into the error that names the image.
struct GridTooLarge {};

// Neighbour k (odd: +1 along a dimension) of vertex u is j, -1 for none; then the -1 entry of j
// along the same dimension is u (written to a spare row when there is no j: no branch).
void link(std::vector<int32_t>& neighbours, int32_t u, int32_t j, int k) {
  int32_t spare[kNeighbours];
  neighbours[int64_t(u) * kNeighbours + k] = j;
  (j >= 0 ? neighbours.data() + int64_t(j) * kNeighbours : spare)[k - 1] = u;
}

// Cell rows [cy_begin, cy_end) in cell order, vertices numbered from 0 in first-seen order;
// writes their pixels' vertices to vertex_of_pixel.
Grid build_band(const GridInput& in, int64_t cy_begin, int64_t cy_end, int32_t* vertex_of_pixel) {
  const int64_t luma_stride = in.layout.stride[2], u_stride = in.layout.stride[3], v_stride = in.layout.stride[4];
  const int64_t colour_base = luma_stride + u_stride + v_stride;  // coordinates are shifted by +1
  const int64_t cells_x = in.cells_x, max_cell_vertices = in.max_cell_vertices, w = in.width;
  Grid g;
  g.first_vertex.resize((cy_end - cy_begin) * cells_x + 1);
  // Photos have a vertex per 10-30 pixels: room for one per 8 (address space only until used)
  // spares the copies of repeated growth.
  const int64_t expected = (in.rows[cy_end] - in.rows[cy_begin]) * w / 8 + max_cell_vertices;
  for (auto* v : {&g.m, &g.w, &g.b}) v->reserve(expected);
  g.colour_of.reserve(expected), g.neighbours.reserve(expected * kNeighbours);
  CellVertexTable tables(max_cell_vertices);
  const CellLookup::View luma = in.luma.view(), chroma = in.chroma.view();
  int32_t nv = 0;
  for (int64_t cy = cy_begin; cy < cy_end; ++cy) {
    for (int64_t cx = 0; cx < cells_x; ++cx) {
      const int64_t cell = (cy - cy_begin) * cells_x + cx;
      const CellVertexTable::Cell table = tables.next_cell();
      g.first_vertex[cell] = nv;
      // Per-vertex arrays stay zero beyond the vertex count, so a new vertex starts its sums at 0.
      for (auto* v : {&g.m, &g.w, &g.b}) grow(*v, nv + max_cell_vertices);
      grow(g.colour_of, nv + max_cell_vertices);
      double *m = g.m.data(), *ws = g.w.data(), *b = g.b.data();
      int64_t* colours = g.colour_of.data();
      // Everything the pixel loop reads is in locals: stores into the arrays could alias members.
      const int64_t x_begin = in.columns[cx], x_end = in.columns[cx + 1], y_end = in.rows[cy + 1];
      const float *target = in.target, *confidence = in.confidence;
      const int64_t confidence_stride = in.confidence_stride;
      for (int64_t y = in.rows[cy]; y < y_end; ++y) {
        const uint8_t* c = in.rgb + 3 * (y * w + x_begin);
        for (int64_t i = y * w + x_begin, end = y * w + x_end; i < end; ++i, c += 3) {
          int64_t yuv[3];
          yuv_e6(c[0], c[1], c[2], yuv);
          const int64_t colour =
              colour_base + luma(yuv[0]) * luma_stride + chroma(yuv[1]) * u_stride + chroma(yuv[2]) * v_stride;
          bool added;
          const int32_t v = table.find_or_add(colour, nv, &added);
          colours[nv] = colour;
          nv += added;
          vertex_of_pixel[i] = v;
          const double ci = confidence[i * confidence_stride];
          m[v] += 1.0, ws[v] += ci, b[v] += ci * static_cast<double>(target[i]);
        }
      }
      // +1 neighbours along luma, U, V lie in this cell; this cell's vertices are the +1 x
      // neighbours of the left cell's and the +1 y neighbours of the upper cell's.
      g.first_vertex[cell + 1] = nv;
      // The bound is checked per cell, before a cell's neighbours are stored: at most one cell
      // of vertices beyond it is ever held, whatever the thread count.
      const int64_t cell_vertices = nv - g.first_vertex[cell];
      if (in.vertices_so_far->fetch_add(cell_vertices, std::memory_order_relaxed) + cell_vertices > in.max_vertices)
        throw GridTooLarge{};
      g.neighbours.resize(int64_t(nv) * kNeighbours, -1);
      for (int32_t u = g.first_vertex[cell]; u < nv; ++u)
        for (int d = 2; d < kDims; ++d) link(g.neighbours, u, table.find(colours[u] + in.layout.stride[d]), 2 * d + 1);
      auto link_cell = [&](int64_t from, int k) {
        for (int32_t u = g.first_vertex[from]; u < g.first_vertex[from + 1]; ++u)
          link(g.neighbours, u, table.find(colours[u]), k);
      };
      const double ss = in.layout.sigma_spatial;
      if (cx > 0 && adjacent_runs(in.columns, cx, ss)) link_cell(cell - 1, 1);
      if (cy > cy_begin && adjacent_runs(in.rows, cy, ss)) link_cell(cell - cells_x, 3);
    }
  }
  g.vertices = nv;
  for (auto* v : {&g.m, &g.w, &g.b}) v->resize(nv);
  g.colour_of.resize(nv);
  return g;
}

// The whole image's grid: bands of cell rows built in parallel (one per thread when the image is
// large enough), renumbered into one vertex list in cell order (the numbering, and so the result,
// does not depend on the number of bands), then linked across band boundaries along y.
Grid build_grid(const GridLayout& layout, const ColourCells& colours, const uint8_t* rgb, const float* target,
                const float* confidence, int64_t confidence_stride, int64_t h, int64_t w, int32_t* vertex_of_pixel,
                int helpers, int64_t max_vertices) {
  std::atomic<int64_t> vertices_so_far{0};
  GridInput in{layout, rgb, target, confidence, confidence_stride, w, colours.luma, colours.chroma,
               cell_starts(w, layout.sigma_spatial), cell_starts(h, layout.sigma_spatial), 0, 0, max_vertices,
               &vertices_so_far};
  in.cells_x = static_cast<int64_t>(in.columns.size()) - 1;
  // (stride[0], the x stride, is the number of colour keys; a huge sigma_spatial makes huge cells)
  in.max_cell_vertices = std::min(longest_run(in.columns) * longest_run(in.rows), layout.stride[0]);
  const int64_t cells_y = static_cast<int64_t>(in.rows.size()) - 1;
  const int64_t bands = helpers > 0 ? std::clamp<int64_t>(h * w / kBandPixels, 1, cells_y) : 1;
  std::vector<Grid> band(bands);
  auto band_rows = [&](int64_t k) { return k * cells_y / bands; };  // first cell row of band k
  share_tasks(bands, helpers, [&](int64_t k, int) {
    band[k] = build_band(in, band_rows(k), band_rows(k + 1), vertex_of_pixel);
  });
  if (bands == 1) return std::move(band[0]);

  std::vector<int32_t> offset(bands + 1, 0);
  for (int64_t k = 0; k < bands; ++k) offset[k + 1] = offset[k] + static_cast<int32_t>(band[k].vertices);
  Grid g;
  g.vertices = offset[bands];
  g.neighbours.resize(g.vertices * kNeighbours);
  for (auto* v : {&g.m, &g.w, &g.b}) v->resize(g.vertices);
  g.colour_of.resize(g.vertices);
  share_tasks(bands, helpers, [&](int64_t k, int) {
    {
      const Grid& b = band[k];
      const int32_t o = offset[k];
      std::copy_n(b.m.begin(), b.vertices, g.m.begin() + o), std::copy_n(b.w.begin(), b.vertices, g.w.begin() + o);
      std::copy_n(b.b.begin(), b.vertices, g.b.begin() + o);
      std::copy_n(b.colour_of.begin(), b.vertices, g.colour_of.begin() + o);
      for (int64_t e = 0; e < b.vertices * kNeighbours; ++e)
        g.neighbours[o * int64_t(kNeighbours) + e] = b.neighbours[e] < 0 ? -1 : b.neighbours[e] + o;
      for (int64_t i = in.rows[band_rows(k)] * w; i < in.rows[band_rows(k + 1)] * w; ++i) vertex_of_pixel[i] += o;
    }
  });
  // Band k's first cell row is the +1 y neighbour of band k - 1's last: one table per cell.
  CellVertexTable tables(in.max_cell_vertices);
  for (int64_t k = 1; k < bands; ++k) {
    if (!adjacent_runs(in.rows, band_rows(k), layout.sigma_spatial)) continue;
    const Grid &upper = band[k - 1], &lower = band[k];
    const int64_t upper_row = (band_rows(k) - 1 - band_rows(k - 1)) * in.cells_x;
    for (int64_t cx = 0; cx < in.cells_x; ++cx) {
      const CellVertexTable::Cell table = tables.next_cell();
      bool added;
      for (int32_t v = lower.first_vertex[cx]; v < lower.first_vertex[cx + 1]; ++v)
        table.find_or_add(lower.colour_of[v], v + offset[k], &added);
      for (int32_t u = upper.first_vertex[upper_row + cx]; u < upper.first_vertex[upper_row + cx + 1]; ++u)
        link(g.neighbours, u + offset[k - 1], table.find(upper.colour_of[u]), 3);
    }
  }
  return g;
}

// Solves one image of h x w pixels; writes the soft output to out[h * w].
void solve_image(const GridLayout& layout, const ColourCells& colours, const uint8_t* rgb, const float* target,
                 const float* confidence, int64_t confidence_stride, int64_t h, int64_t w, double lam, int64_t max_iter,
                 double tol, float* out, bool split, int64_t index, int64_t max_vertices) {
  const int64_t pixels = h * w;
  const int pixel_helpers = split ? helpers_or_idle(pixels, kSplitPixels, kIdleSplitPixels) : 0;
  const std::unique_ptr<int32_t[]> vertex_of_pixel(new int32_t[pixels]);  // every entry is written: no zeroing
  Grid grid;
  try {
    grid = build_grid(layout, colours, rgb, target, confidence, confidence_stride, h, w, vertex_of_pixel.get(),
                      pixel_helpers, max_vertices);
  } catch (const GridTooLarge&) {
    TORCH_CHECK_VALUE(false, vertex_cap_message(index, h, w, max_vertices));
  }
  const int64_t nv = grid.vertices;
  for (int32_t& j : grid.neighbours) j = j < 0 ? static_cast<int32_t>(nv) : j;  // the sentinel
  std::vector<double>&m = grid.m, &wsplat = grid.w, &b = grid.b;
  const SentinelNeighbours neighbours{grid.neighbours.data()};
  // Every vector the blur gathers from has a zero entry [nv] (the sentinel). All buffers exist
  // before the team starts: a helper leaves after a while without work, and first-touching tens
  // of MB (a large image's CG vectors) between two regions took longer than that.
  std::vector<double> n(nv + 1, 1.0), scratch(nv + 1, 0.0);
  n[nv] = 0.0;
  std::vector<double> diag(nv), lam_n(nv), inv_diag(nv), y(nv), r(nv), u(nv), nu(nv + 1, 0.0), s(nv, 0.0),
      p(nv, 0.0), q(nv);  // CG; nu = n * u, gathered by the blur
  // One team for the bistochastization and CG regions (two per CG iteration, too short to wake a
  // thread for each): its helpers spin between them (share_tasks.h).
  SpinningTeam team = torch_team(split ? helpers_or_idle(nv, kSplitVertices, kIdleSplitVertices) : 0);

  // Bistochastization.
  auto blur_n = [&](int64_t v) { return blur_at(neighbours, v, [&](int64_t j) { return n[j]; }); };
  for (int it = 0; it < kBistochasticSteps; ++it) {
    for_vertices(nv, team, [&](int64_t v) { scratch[v] = bistochastic_step(n[v], m[v], blur_n(v)); });
    std::swap(n, scratch);
  }
  for_vertices(nv, team, [&](int64_t v) { m[v] = n[v] * blur_n(v); });

  // Preconditioned CG from y0 = b / w with scipy's stopping rule (before every iteration:
  // stop when |r| < tol |b|; at most max_iter iterations), in the Chronopoulos-Gear arrangement:
  // the same iterates in exact arithmetic, but one elementwise pass and one pass applying A per
  // iteration instead of three passes (s = A p is kept by recurrence).
  const double b_norm = std::sqrt(sum_vertices<1>(nv, team, [&](int64_t v, std::array<double, 1>& acc) {
    y[v] = wsplat[v] > 0 ? b[v] / wsplat[v] : 0.0;
    nu[v] = n[v] * y[v];
    diag[v] = a_diagonal(m[v], n[v], wsplat[v], lam);
    lam_n[v] = lam * n[v];
    inv_diag[v] = 1.0 / std::max(diag[v], kDiagMin);
    acc[0] += b[v] * b[v];
  })[0]);
  if (b_norm == 0.0) {
    std::fill(out, out + pixels, 0.0f);
    return;
  }
  const double atol = tol * b_norm;
  auto apply_a = [&](const std::vector<double>& x, int64_t v) {
    return apply_a_factored(neighbours, diag[v], lam_n[v], x[v], nu.data(), v);
  };
  // u = M r, nu = n u, with r.r and r.u.
  auto precondition = [&](int64_t v, std::array<double, 2>& acc) {
    u[v] = r[v] * inv_diag[v];
    acc[0] += r[v] * r[v];
    acc[1] += r[v] * u[v];
  };
  auto sums = sum_vertices<2>(nv, team, [&](int64_t v, std::array<double, 2>& acc) {
    r[v] = b[v] - apply_a(y, v);
    precondition(v, acc);
  });
  for_vertices(nv, team, [&](int64_t v) { nu[v] = n[v] * u[v]; });
  double alpha = 0.0, gamma_prev = 0.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    if (std::sqrt(sums[0]) < atol) break;
    const double gamma = sums[1];
    const double delta = sum_chunks<1>(nv, team, [&](int64_t begin, int64_t end) {
      double qu = 0.0;
#pragma omp simd reduction(+ : qu)  // partial sums per lane: no serial chain of adds
      for (int64_t v = begin; v < end; ++v) {
        q[v] = apply_a(u, v);  // q = A u
        qu += q[v] * u[v];
      }
      return std::array<double, 1>{qu};
    })[0];
    const double beta = it == 0 ? 0.0 : gamma / gamma_prev;
    const double pap = it == 0 ? delta : delta - beta * gamma / alpha;  // p.Ap of the new direction
    alpha = pap != 0.0 ? gamma / pap : 0.0;  // p.Ap == 0 only when r == 0 (tol == 0)
    gamma_prev = gamma;
    sums = sum_chunks<2>(nv, team, [&](int64_t begin, int64_t end) {
      double rr = 0.0, ru = 0.0;
      double *pp = p.data(), *ps = s.data(), *py = y.data(), *pr = r.data(), *pu = u.data(), *pnu = nu.data();
      const double *pq = q.data(), *pinv = inv_diag.data(), *pn = n.data();
#pragma omp simd reduction(+ : rr, ru)  // the hot elementwise pass: vectorised, partial sums per lane
      for (int64_t v = begin; v < end; ++v) {
        pp[v] = pu[v] + beta * pp[v];
        ps[v] = pq[v] + beta * ps[v];
        py[v] += alpha * pp[v];
        pr[v] -= alpha * ps[v];
        pu[v] = pr[v] * pinv[v];
        pnu[v] = pn[v] * pu[v];
        rr += pr[v] * pr[v];
        ru += pr[v] * pu[v];
      }
      return std::array<double, 2>{rr, ru};
    });
    if (alpha == 0.0) break;
  }

  team.close();  // its spinning helpers would hold the cores the slicing's helpers are counted on
  share_tasks((pixels + kPixelGrain - 1) / kPixelGrain, pixel_helpers, [&](int64_t c, int) {
    for (int64_t i = c * kPixelGrain, end = std::min(pixels, i + kPixelGrain); i < end; ++i)
      out[i] = static_cast<float>(y[vertex_of_pixel[i]]);
  });
}

at::Tensor bilateral_solve_cpu(const at::Tensor& image, const at::Tensor& target, const at::Tensor& confidence,
                               const at::Tensor& sizes, double sigma_spatial, double sigma_luma, double sigma_chroma,
                               double lam, int64_t max_iter, double tol, int64_t max_vertices) {
  const BilateralBatch batch = check_bilateral_inputs(image, target, confidence, sizes);
  check_max_vertices(max_vertices);
  check_bilateral_grid(batch, sigma_spatial, sigma_luma, sigma_chroma);
  const auto img = image.contiguous();
  const auto t = target.contiguous();
  // A uniform confidence may come as one value expanded (stride 0): read it in place.
  const int64_t confidence_stride = confidence.dim() == 1 && confidence.numel() > 1 && confidence.stride(0) == 0 ? 0 : 1;
  const auto c = confidence_stride ? confidence.contiguous() : confidence;
  auto out = at::empty({batch.pixels()}, target.options());
  const GridLayout layout = make_layout(batch.max_h, batch.max_w, sigma_spatial, sigma_luma, sigma_chroma);
  const ColourCells colours{CellLookup(sigma_luma, kMaxLumaE6), CellLookup(sigma_chroma, kMaxChromaE6)};
  // Several ordinary-sized images: one task per image, each solved without helpers.
  // Large images: one at a time, each split when its size pays for helpers.
  const bool across_images = batch.size() > 1 && batch.max_h * batch.max_w < (1 << 20);
  auto solve = [&](int64_t i, bool split) {
    const int64_t start = batch.pixel_start[i];
    if (batch.height[i] * batch.width[i] > 0)
      solve_image(layout, colours, img.data_ptr<uint8_t>() + 3 * start, t.data_ptr<float>() + start,
                  c.data_ptr<float>() + start * confidence_stride, confidence_stride, batch.height[i], batch.width[i],
                  lam, max_iter, tol, out.data_ptr<float>() + start, split, i, max_vertices);
  };
  if (across_images) {
    share_tasks(batch.size(), helpers_or_idle(batch.size(), kImagesPerWorker, 1),
                [&](int64_t i, int) { solve(i, false); });
  }
  else
    for (int64_t i = 0; i < batch.size(); ++i) solve(i, true);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(namedmask, CPU, m) { m.impl("bilateral_solve", &bilateral_solve_cpu); }

}  // namespace namedmask
