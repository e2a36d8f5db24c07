// Tensor-core building blocks: ldmatrix (m8n8, b16) and mma.sync m16n8k16 (fp16/bf16 -> fp32),
// with a host emulation of the PTX ISA's documented per-lane fragment layouts (MOKERNELS_EMULATION).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16x16, row-major) a[0]: (g,   2t..2t+1)  a[1]: (g+8, 2t..2t+1)
//                        a[2]: (g,   2t+8..+9)  a[3]: (g+8, 2t+8..+9)
//   B (16x8,  "col")     b[0]: (k=2t..2t+1, n=g)  b[1]: (k=2t+8..+9, n=g)
//   C/D (16x8, fp32)     d[0..1]: (g, 2t..2t+1)  d[2..3]: (g+8, 2t..2t+1)
// Each 32-bit register holds two 16-bit elements, the lower-indexed one in the low half.
// ldmatrix.x{1,2,4}: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives in r[j]
// elements (row l/4, cols 2(l%4)..+1) of matrix j; with .trans, (rows 2(l%4)..+1, col l/4).
// The emulation gathers the warp's registers through the exchange buffer and computes exactly that;
// the `cuda` test of the tile GEMM checks it against the hardware.
#pragma once

#include <cstring>
#include <type_traits>

#include "dtype.cuh"
#include "warp.cuh"

namespace mk {

// Forward maps of the fragment layouts above: which element lane `lane` holds in 16-bit half `half`
// of register `reg`. The emulation is built on these, the tile GEMM's epilogue uses mma_c_coord,
// and tests/test_mma_layout.py checks them against CuTe's SM80 MMA traits.
struct RowCol { int row, col; };
// A (16x16, row-major): (m, k)
MK_HOST_DEVICE constexpr RowCol mma_a_coord(int lane, int reg, int half) {
  return {lane / 4 + 8 * (reg % 2), 2 * (lane % 4) + half + 8 * (reg / 2)};
}
// B (16x8): (k, n)
MK_HOST_DEVICE constexpr RowCol mma_b_coord(int lane, int reg, int half) {
  return {2 * (lane % 4) + half + 8 * reg, lane / 4};
}
// C/D (16x8, fp32), element i of 4: (m, n)
MK_HOST_DEVICE constexpr RowCol mma_c_coord(int lane, int i) { return {lane / 4 + 8 * (i / 2), 2 * (lane % 4) + i % 2}; }
// ldmatrix: (row, col) inside matrix `reg` of the 16-bit element `half` that lane `lane` receives;
// the row's address came from lane 8 * reg + row.
MK_HOST_DEVICE constexpr RowCol ldmatrix_coord(int lane, int half, bool trans) {
  return trans ? RowCol{2 * (lane % 4) + half, lane / 4} : RowCol{lane / 4, 2 * (lane % 4) + half};
}

#if defined(MOKERNELS_EMULATION)
namespace emu_detail {
template <class T> inline float half_of(uint32_t reg, int h) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * h));
  T x;
  std::memcpy(static_cast<void*>(&x), &bits, sizeof(bits));
  return to_acc(x);
}
template <int NUM, bool TRANS> inline void ldmatrix_emu(uint32_t* r, const void* row_ptr) {
  namespace e = ::mk::emu;
  const int lane = e::lane_id();
  e::require_aligned(row_ptr, 16, "ldmatrix row address is not 16-byte aligned");
  e::exchange_put(&row_ptr, sizeof(row_ptr));
  e::warp_sync(TRANS ? "ldmatrix.trans" : "ldmatrix");
  for (int j = 0; j < NUM; ++j) {
    uint16_t v[2];
    for (int h = 0; h < 2; ++h) {
      const RowCol rc = ldmatrix_coord(lane, h, TRANS);
      const int src = j * 8 + rc.row;  // the lane that gave this row's address
      if (!e::lane_exists(src)) e::fail("ldmatrix row address from a lane that does not exist");
      const unsigned char* p;
      e::exchange_get(src, &p, sizeof(p));
      std::memcpy(&v[h], p + 2 * rc.col, 2);
    }
    r[j] = static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 16);
  }
  e::warp_sync(TRANS ? "ldmatrix.trans" : "ldmatrix");
}
}  // namespace emu_detail
#endif

// r[j] <- matrix j (8x8 of 16-bit) from shared memory; `row_ptr` is this lane's row address
// (16-byte aligned). NUM in {1, 2, 4}.
template <int NUM> MK_DEVICE void ldmatrix(uint32_t (&r)[NUM], const void* row_ptr) {
  static_assert(NUM == 1 || NUM == 2 || NUM == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(MOKERNELS_EMULATION)
  emu_detail::ldmatrix_emu<NUM, false>(r, row_ptr);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  if constexpr (NUM == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row_ptr)));
  else if constexpr (NUM == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row_ptr)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row_ptr)));
#else
  __trap();
#endif
}

// As ldmatrix, transposing each 8x8 matrix (for operands stored K-major, e.g. B as [K, N]).
template <int NUM> MK_DEVICE void ldmatrix_trans(uint32_t (&r)[NUM], const void* row_ptr) {
  static_assert(NUM == 1 || NUM == 2 || NUM == 4, "ldmatrix loads 1, 2 or 4 matrices");
#if defined(MOKERNELS_EMULATION)
  emu_detail::ldmatrix_emu<NUM, true>(r, row_ptr);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  if constexpr (NUM == 4)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(row_ptr)));
  else if constexpr (NUM == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row_ptr)));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(smem_u32(row_ptr)));
#else
  __trap();
#endif
}

// d = a * b + c for one m16n8k16 tile; T is __nv_bfloat16 or __half.
template <class T>
MK_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma operand type");
#if defined(MOKERNELS_EMULATION)
  namespace e = ::mk::emu;
  struct Frag { uint32_t a[4]; uint32_t b[2]; };
  const int lane = e::lane_id();
  const Frag mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  e::exchange_put(&mine, sizeof(Frag));
  e::warp_sync("mma.sync");
  for (int l = 0; l < kWarpSize; ++l)
    if (!e::lane_exists(l)) e::fail("mma.sync in a warp with fewer than 32 threads");
  // Scatter every lane's registers into the full tiles through the layout maps, then compute.
  float A[16][16], B[16][8];
  for (int l = 0; l < kWarpSize; ++l) {
    Frag f;
    e::exchange_get(l, &f, sizeof(Frag));
    for (int h = 0; h < 2; ++h) {
      for (int reg = 0; reg < 4; ++reg) {
        const RowCol rc = mma_a_coord(l, reg, h);
        A[rc.row][rc.col] = emu_detail::half_of<T>(f.a[reg], h);
      }
      for (int reg = 0; reg < 2; ++reg) {
        const RowCol rc = mma_b_coord(l, reg, h);
        B[rc.row][rc.col] = emu_detail::half_of<T>(f.b[reg], h);
      }
    }
  }
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const RowCol rc = mma_c_coord(lane, i);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A[rc.row][k] * B[k][rc.col];
    out[i] = acc;
  }
  e::warp_sync("mma.sync");
  for (int i = 0; i < 4; ++i) d[i] = out[i];
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
  __trap();
#endif
}

}  // namespace mk
