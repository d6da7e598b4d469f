// Per-pixel rule of the copy-paste composite (namedmask/copy_paste.h): the gather form the
// CUDA kernel evaluates per output pixel equals painting the pastes in order (the CPU
// kernel's form), on random small batches; plus the foreground test, placements and boxes.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "namedmask/copy_paste.h"
#include "expect.h"


using namespace namedmask;

// Painter's form: copy the base, then paint each paste's foreground in order.
static std::vector<int> painted(const std::vector<int>& labels, const std::vector<int64_t>& boxes,
                                const std::vector<int64_t>& sources, const std::vector<int64_t>& offsets, int64_t B,
                                int64_t H, int64_t W, int64_t P) {
  std::vector<int> out(labels);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t i = b * P + p;
      const Placement pl = place(sources[i], offsets[2 * i], offsets[2 * i + 1], boxes.data(), B, H, W);
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          if (!covers(pl, y, x)) continue;
          const int l = labels[pl.source * H * W + source_pixel(pl, y, x, W)];
          if (is_foreground(l, 0, 255)) out[(b * H + y) * W + x] = l;
        }
    }
  return out;
}

int main() {
  EXPECT_EQ(is_foreground<uint8_t>(0, 0, 255), 0);
  EXPECT_EQ(is_foreground<uint8_t>(1, 0, 255), 1);
  EXPECT_EQ(is_foreground<uint8_t>(254, 0, 255), 1);
  EXPECT_EQ(is_foreground<uint8_t>(255, 0, 255), 0);
  EXPECT_EQ(is_foreground<int64_t>(-1, -2, 255), 1);  // custom background id

  // The label-typed range test equals is_foreground for every uint8 label and many id pairs.
  const int64_t ids[] = {-1000, -2, -1, 0, 1, 2, 20, 127, 128, 253, 254, 255, 256, 1000};
  for (int64_t bg : ids)
    for (int64_t ig : ids) {
      const auto range = foreground_range<uint8_t>(bg, ig);
      for (int l = 0; l < 256; ++l)
        EXPECT_EQ(range.contains(static_cast<uint8_t>(l)), is_foreground(static_cast<uint8_t>(l), bg, ig));
      const auto wide = foreground_range<int64_t>(bg, ig);
      for (int64_t l : ids) EXPECT_EQ(wide.contains(l), is_foreground(l, bg, ig));
    }
  const int64_t big = std::numeric_limits<int64_t>::max(), small = std::numeric_limits<int64_t>::lowest();
  EXPECT_EQ(foreground_range<int64_t>(small, big).contains(small + 1), 1);
  EXPECT_EQ(foreground_range<int64_t>(small, big).contains(small), 0);
  EXPECT_EQ(foreground_range<int64_t>(big, big).contains(big), 0);

  // A 2x3 box (rows 1..2, cols 4..6) landing at (5, 0): inclusive, so 2 rows and 3 columns.
  const std::vector<int64_t> one_box = {1, 4, 2, 6};
  Placement pl = place(0, 5, 0, one_box.data(), 1, 10, 10);
  EXPECT_EQ(pl.y1 - pl.y0 + 1, 2);
  EXPECT_EQ(pl.x1 - pl.x0 + 1, 3);
  EXPECT_EQ(covers(pl, 6, 2), 1);  // last row and column of the box are pasted
  EXPECT_EQ(covers(pl, 7, 2), 0);
  EXPECT_EQ(source_pixel(pl, 6, 2, 10), 2 * 10 + 6);
  EXPECT_EQ(place(-1, 0, 0, one_box.data(), 1, 10, 10).source, -1);  // no paste
  EXPECT_EQ(place(1, 0, 0, one_box.data(), 1, 10, 10).source, -1);   // outside the batch
  const std::vector<int64_t> empty = {-1, -1, -1, -1};
  EXPECT_EQ(place(0, 0, 0, empty.data(), 1, 10, 10).source, -1);  // no foreground
  const std::vector<int64_t> off_canvas = {0, 0, 10, 3};
  EXPECT_EQ(place(0, 0, 0, off_canvas.data(), 1, 10, 10).source, -1);

  Box box = empty_box(4, 4);
  EXPECT_EQ(finish_box(box).y0, -1);
  box = merge(merge(box, Box{2, 3, 2, 3}), Box{1, 0, 1, 1});
  EXPECT_EQ(finish_box(box).y0, 1);
  EXPECT_EQ(finish_box(box).x0, 0);
  EXPECT_EQ(finish_box(box).y1, 2);
  EXPECT_EQ(finish_box(box).x1, 3);

  // Gather form == painter's form on random batches with overlapping pastes.
  std::mt19937 rng(0);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t B = 1 + rng() % 4, H = 1 + rng() % 9, W = 1 + rng() % 9, P = rng() % 4;
    std::vector<int> labels(B * H * W);
    for (auto& l : labels) l = (rng() % 3 == 0) ? 0 : (rng() % 5 == 0 ? 255 : 1 + rng() % 20);
    std::vector<int64_t> boxes(4 * B);
    for (int64_t b = 0; b < B; ++b) {
      Box bx = empty_box(H, W);
      for (int64_t i = 0; i < H * W; ++i)
        if (is_foreground(labels[b * H * W + i], 0, 255)) bx = merge(bx, Box{i / W, i % W, i / W, i % W});
      bx = finish_box(bx);
      boxes[4 * b] = bx.y0, boxes[4 * b + 1] = bx.x0, boxes[4 * b + 2] = bx.y1, boxes[4 * b + 3] = bx.x1;
    }
    std::vector<int64_t> sources(B * P), offsets(2 * B * P);
    for (int64_t i = 0; i < B * P; ++i) {
      sources[i] = static_cast<int64_t>(rng() % (B + 1)) - 1;
      offsets[2 * i] = static_cast<int64_t>(rng() % (H + 2)) - 1;  // some clipped at the border
      offsets[2 * i + 1] = static_cast<int64_t>(rng() % (W + 2)) - 1;
    }
    const auto want = painted(labels, boxes, sources, offsets, B, H, W, P);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          const Placement won = winning_placement(sources.data() + b * P, offsets.data() + 2 * b * P, P, boxes.data(),
                                                  labels.data(), B, H, W, y, x, 0, 255);
          const int got = won.source < 0 ? labels[(b * H + y) * W + x]
                                         : labels[won.source * H * W + source_pixel(won, y, x, W)];
          EXPECT_EQ(got, want[(b * H + y) * W + x]);
        }
  }
  return finish("copy_paste");
}
