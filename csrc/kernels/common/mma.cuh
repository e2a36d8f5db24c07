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
  std::memcpy(e::exchange_slot(lane), &row_ptr, sizeof(row_ptr));
  e::warp_sync();
  for (int j = 0; j < NUM; ++j) {
    uint16_t v[2];
    for (int h = 0; h < 2; ++h) {
      // row-source lane and element offset (in 16-bit units) inside that row
      const int src = TRANS ? j * 8 + 2 * (lane % 4) + h : j * 8 + lane / 4;
      const int col = TRANS ? lane / 4 : 2 * (lane % 4) + h;
      if (!e::lane_exists(src)) e::fail("ldmatrix row address from a lane that does not exist");
      const unsigned char* p;
      std::memcpy(&p, e::exchange_slot(src), sizeof(p));
      std::memcpy(&v[h], p + 2 * col, 2);
    }
    r[j] = static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 16);
  }
  e::warp_sync();
}
}  // namespace emu_detail
#else
MK_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
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
  std::memcpy(e::exchange_slot(lane), &mine, sizeof(Frag));
  e::warp_sync();
  for (int l = 0; l < kWarpSize; ++l)
    if (!e::lane_exists(l)) e::fail("mma.sync in a warp with fewer than 32 threads");
  auto frag = [&](int l) { Frag f; std::memcpy(&f, e::exchange_slot(l), sizeof(Frag)); return f; };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      const Frag fa = frag((row % 8) * 4 + (k % 8) / 2);
      const Frag fb = frag(col * 4 + (k % 8) / 2);
      const float av = emu_detail::half_of<T>(fa.a[(row / 8) + 2 * (k / 8)], k % 2);
      const float bv = emu_detail::half_of<T>(fb.b[k / 8], k % 2);
      acc += av * bv;
    }
    out[i] = acc;
  }
  e::warp_sync();
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
