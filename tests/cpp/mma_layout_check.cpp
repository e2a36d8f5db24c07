// Cross-checks the fragment-layout maps of csrc/kernels/common/mma.cuh (on which the emulation of
// mma.sync and ldmatrix is built) against CuTe's encoding of the same hardware layouts
// (MMA_Traits<SM80_16x8x16_*_TN>, Copy_Traits<SM75_U32x4_LDSM_N / SM75_U16x8_LDSM_T>): an
// independent, NVIDIA-maintained statement of the PTX ISA tables. Prints "OK <checks>" or mismatches.
#include <cstdio>

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/layout.hpp>

#include "kernels/common/mma.cuh"

int main() {
  using namespace cute;
  int checks = 0, bad = 0;
  auto expect = [&](bool ok, const char* what, int lane, int reg, int half) {
    ++checks;
    if (!ok && ++bad <= 20) std::printf("MISMATCH %s lane %d reg %d half %d\n", what, lane, reg, half);
  };
  using Mma = MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>;
  const auto A = typename Mma::ALayout{};  // (thread, value) -> m + 16 k
  const auto B = typename Mma::BLayout{};  // (thread, value) -> n + 8 k
  const auto C = typename Mma::CLayout{};  // (thread, value) -> m + 16 n
  const auto ldsm = typename Copy_Traits<SM75_U32x4_LDSM_N>::DstLayout{};   // -> bit of 32 rows x 128 bits
  const auto ldsm_t = typename Copy_Traits<SM75_U16x8_LDSM_T>::DstLayout{};
  for (int l = 0; l < 32; ++l) {
    for (int v = 0; v < 8; ++v) {  // value v = half + 2 * reg
      const int idx = A(l, v);
      const mk::RowCol rc = mk::mma_a_coord(l, v / 2, v % 2);
      expect(rc.row == idx % 16 && rc.col == idx / 16, "A", l, v / 2, v % 2);
    }
    for (int v = 0; v < 4; ++v) {
      const int idx = B(l, v);
      const mk::RowCol rc = mk::mma_b_coord(l, v / 2, v % 2);  // (k, n)
      expect(rc.row == idx / 8 && rc.col == idx % 8, "B", l, v / 2, v % 2);
      const int cidx = C(l, v);
      const mk::RowCol cc = mk::mma_c_coord(l, v);
      expect(cc.row == cidx % 16 && cc.col == cidx / 16, "C", l, v, 0);
    }
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h) {
        // source lane (row address) = bit / 128, element within that 8-element row = (bit % 128) / 16
        const int bit = ldsm(l, make_coord(16 * h, j));
        const mk::RowCol rc = mk::ldmatrix_coord(l, h, false);
        expect(bit / 128 == 8 * j + rc.row && (bit % 128) / 16 == rc.col, "ldmatrix", l, j, h);
        const int tbit = ldsm_t(l, make_coord(0, h, j));
        const mk::RowCol tc = mk::ldmatrix_coord(l, h, true);
        expect(tbit / 128 == 8 * j + tc.row && (tbit % 128) / 16 == tc.col, "ldmatrix.trans", l, j, h);
      }
  }
  if (bad) {
    std::printf("FAILED %d of %d\n", bad, checks);
    return 1;
  }
  std::printf("OK %d\n", checks);
  return 0;
}
