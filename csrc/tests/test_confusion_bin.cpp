// Per-pixel rule of the confusion histogram (namedmask/confusion_matrix.h).
#include <cstdio>
#include <cstdlib>

#include "namedmask/confusion_matrix.h"
#include "expect.h"


int main() {
  using namedmask::confusion_bin;
  EXPECT_EQ(confusion_bin<uint8_t, uint8_t>(3, 2, 21, 255), 2 * 22 + 3);
  EXPECT_EQ(confusion_bin<uint8_t, uint8_t>(0, 255, 21, 255), -1);       // ignored target
  EXPECT_EQ(confusion_bin<uint8_t, uint8_t>(0, 21, 21, 255), -1);        // void target
  EXPECT_EQ(confusion_bin<int64_t, int64_t>(1, -1, 21, 255), -1);        // negative target
  EXPECT_EQ(confusion_bin<int64_t, int64_t>(1, 4, 21, 4), -1);           // ignore_index inside range
  EXPECT_EQ(confusion_bin<uint8_t, uint8_t>(30, 1, 21, 255), 1 * 22 + 21);  // bad prediction -> last column
  EXPECT_EQ(confusion_bin<int32_t, uint8_t>(-3, 0, 21, 255), 21);
  EXPECT_EQ(confusion_bin<int64_t, int32_t>(999, 999, 1000, 255), 999 * 1001 + 999);
  return finish("confusion_bin");
}
