#pragma once
// Per-pixel rule of the copy-paste composite, shared by the CPU and CUDA kernels.
//
// Sample b receives up to P objects. Paste p cuts the foreground of sample sources[b, p]
// inside its tight inclusive box and lands the box's top-left corner at offsets[b, p].
// An output pixel takes the source pixel of the LAST paste whose rectangle covers it and
// whose source pixel is foreground; otherwise it keeps the base pixel.
//
// The CUDA kernel evaluates this rule per output pixel (winning_placement); the CPU kernel
// paints the pastes in order onto a copy of the base row, which gives the same result
// (csrc/tests/test_copy_paste.cpp checks both formulations against each other).
#include <limits>

#include "namedmask/common.h"

namespace namedmask {

// Foreground = strictly between the background id and the ignore id.
template <typename L>
NM_HD bool is_foreground(L label, int64_t background, int64_t ignore_index) {
  const int64_t l = static_cast<int64_t>(label);
  return background < l && l < ignore_index;
}

// The same test in the label type's own arithmetic, for CPU loops that vectorise only
// without widening: foreground iff lo <= label <= hi (never when lo > hi).
template <typename L>
struct ForegroundRange {
  L lo, hi;
  NM_HD bool contains(L label) const { return (label >= lo) & (label <= hi); }
};

template <typename L>
ForegroundRange<L> foreground_range(int64_t background, int64_t ignore_index) {
  const int64_t lowest = std::numeric_limits<L>::lowest(), highest = std::numeric_limits<L>::max();
  if (background >= highest || ignore_index <= lowest || background >= ignore_index)
    return {static_cast<L>(highest), static_cast<L>(lowest)};  // nothing is foreground
  const int64_t lo = background < lowest ? lowest : background + 1;
  const int64_t hi = ignore_index > highest ? highest : ignore_index - 1;
  return {static_cast<L>(lo), static_cast<L>(hi)};  // lo > hi when no L lies strictly between
}

// Where one paste lands. Destination pixel (y, x) inside [y0, y1] x [x0, x1] (inclusive)
// reads source pixel (y + shift_y, x + shift_x) of sample `source`.
struct Placement {
  int64_t source = -1;  // batch index of the pasted object; -1 = this paste does nothing
  int64_t y0 = 0, x0 = 0, y1 = -1, x1 = -1;
  int64_t shift_y = 0, shift_x = 0;
};

// The placement of source sample `source` (-1 = none) at offset (oy, ox). boxes is int64
// [batch, 4] (y0, x0, y1, x1), (-1, -1, -1, -1) = no foreground. A source or box outside
// the batch or canvas pastes nothing, so kernels stay in bounds whatever they are given
// (the Python wrapper rejects such inputs before they get here).
NM_HD Placement place(int64_t source, int64_t oy, int64_t ox, const int64_t* boxes, int64_t batch,
                      int64_t height, int64_t width) {
  Placement p;
  if (source < 0 || source >= batch) return p;
  const int64_t* box = boxes + 4 * source;
  if (box[0] < 0 || box[1] < 0 || box[2] < box[0] || box[3] < box[1] || box[2] >= height || box[3] >= width) return p;
  p.source = source;
  p.y0 = oy;
  p.x0 = ox;
  p.y1 = oy + (box[2] - box[0]);
  p.x1 = ox + (box[3] - box[1]);
  p.shift_y = box[0] - oy;
  p.shift_x = box[1] - ox;
  return p;
}

NM_HD bool covers_row(const Placement& p, int64_t y) { return p.source >= 0 && p.y0 <= y && y <= p.y1; }

NM_HD bool covers(const Placement& p, int64_t y, int64_t x) { return covers_row(p, y) && p.x0 <= x && x <= p.x1; }

// Index of the source pixel of a covered destination pixel within its sample's H*W plane.
NM_HD int64_t source_pixel(const Placement& p, int64_t y, int64_t x, int64_t width) {
  return (y + p.shift_y) * width + (x + p.shift_x);
}

// The rule for one output pixel (y, x) of a sample whose pastes are sources[0..P) and
// offsets[0..2P): the placement it takes its value from (source == -1: keep the base).
// labels is the whole input batch [batch, height, width].
template <typename L>
NM_HD Placement winning_placement(const int64_t* sources, const int64_t* offsets, int64_t num_pastes,
                                  const int64_t* boxes, const L* labels, int64_t batch, int64_t height,
                                  int64_t width, int64_t y, int64_t x, int64_t background, int64_t ignore_index) {
  for (int64_t p = num_pastes - 1; p >= 0; --p) {  // later pastes cover earlier ones
    const Placement pl = place(sources[p], offsets[2 * p], offsets[2 * p + 1], boxes, batch, height, width);
    if (!covers(pl, y, x)) continue;
    const L label = labels[pl.source * height * width + source_pixel(pl, y, x, width)];
    if (is_foreground(label, background, ignore_index)) return pl;
  }
  return Placement{};
}

// Tight inclusive box of the foreground, accumulated pixel by pixel.
struct Box {
  int64_t y0, x0, y1, x1;  // y1 < 0 while empty
};

NM_HD Box empty_box(int64_t height, int64_t width) { return Box{height, width, -1, -1}; }

NM_HD Box merge(Box a, Box b) {
  return Box{a.y0 < b.y0 ? a.y0 : b.y0, a.x0 < b.x0 ? a.x0 : b.x0, a.y1 > b.y1 ? a.y1 : b.y1,
             a.x1 > b.x1 ? a.x1 : b.x1};
}

// The op's output encoding: (-1, -1, -1, -1) when nothing was foreground.
NM_HD Box finish_box(Box b) { return b.y1 < 0 ? Box{-1, -1, -1, -1} : b; }

}  // namespace namedmask
