// Asynchronous global -> shared copies (cp.async, sm_80+) and their group synchronisation, with a
// CPU emulation that follows the PTX ISA's semantics instead of copying at once.
//
// PTX semantics relied on (PTX ISA, "cp.async", "cp.async.commit_group", "cp.async.wait_group"):
//  * cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}: a NON-BLOCKING copy of cp-size
//    bytes (.ca: 4, 8 or 16; .cg: 16) issued by the executing thread; dst and src must be aligned to
//    cp-size. With src-size (< cp-size), only src-size bytes are read and the rest of dst is
//    zero-filled (edge tiles). No ordering is guaranteed between the copy and later accesses to dst
//    until the thread waits for it.
//  * cp.async.commit_group: puts all prior cp.async of the executing thread that are not yet in a
//    group into a new cp.async-group (groups are per thread; an empty group is legal).
//  * cp.async.wait_group N: waits until at most the N most recent groups of the executing thread are
//    pending and all earlier ones are complete; N = 0 waits for all committed groups.
//    cp.async.wait_all = cp.async.commit_group + cp.async.wait_group 0.
//  * The copies' writes are visible to the executing thread after its wait; other threads of the block
//    need a barrier after the wait. __syncthreads itself does NOT wait for pending copies.
//
// Emulation (csrc/emu, per thread): a cp.async records the copy in the thread's open group and fills
// dst with 0xFF bytes (NaN) right away, performing nothing; commit closes the group; wait_group<N>
// performs every committed group but the newest N, oldest first. So a missing wait, too large an N,
// a missing commit, or a reader in another thread without a barrier after the writer's wait reads
// poison. Misaligned addresses fail the launch. Copies still pending when the block ends are
// performed then (the data a GPU would eventually write).
#pragma once

#include "platform.cuh"

namespace mk {

namespace async_detail {
// cp-size must be an immediate: one asm per form (the branches fold at compile time).
template <int N, bool CG, bool ZFILL>
MK_DEVICE void copy(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(MOKERNELS_EMULATION)
  if (src_bytes < 0) ::mk::emu::fail("cp.async: negative src-size");
  ::mk::emu::cp_async(smem_dst, gmem_src, N, static_cast<unsigned>(src_bytes));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t dst = smem_u32(smem_dst);
  if constexpr (ZFILL)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
                 : "memory");
  else if constexpr (CG)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem_src), "n"(N) : "memory");
#else
  __trap();  // cp.async needs sm_80
#endif
}
}  // namespace async_detail

// N (4, 8 or 16) bytes from global to shared memory, cached in L1 and L2 (.ca); both addresses N-aligned.
template <int N> MK_DEVICE void cp_async_ca(void* smem_dst, const void* gmem_src) {
  static_assert(N == 4 || N == 8 || N == 16, "cp.async.ca copies 4, 8 or 16 bytes");
  async_detail::copy<N, false, false>(smem_dst, gmem_src, N);
}

// 16 bytes from global to shared memory, cached in L2 only (.cg); both addresses 16-aligned.
template <int N> MK_DEVICE void cp_async_cg(void* smem_dst, const void* gmem_src) {
  static_assert(N == 16, "cp.async.cg copies 16 bytes");
  async_detail::copy<N, true, false>(smem_dst, gmem_src, N);
}

// As cp_async_cg<16>, reading only src_bytes (0..16) from gmem_src and zero-filling the rest of the 16
// destination bytes (GEMM edge tiles: src_bytes = 0 writes 16 zero bytes and reads nothing, but
// gmem_src must still be a valid, aligned address).
template <int N> MK_DEVICE void cp_async_cg_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  static_assert(N == 16, "cp.async.cg copies 16 bytes");
  async_detail::copy<N, true, true>(smem_dst, gmem_src, src_bytes);
}

// Closes this thread's group of cp.async issued since the last commit (an empty group is fine).
MK_DEVICE void cp_async_commit_group() {
#if defined(MOKERNELS_EMULATION)
  ::mk::emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most the N most recent committed groups of this thread are pending. The data is then
// visible to THIS thread; other threads need a block_sync() after it.
template <int N> MK_DEVICE void cp_async_wait_group() {
  static_assert(N >= 0, "cp.async.wait_group N >= 0");
#if defined(MOKERNELS_EMULATION)
  ::mk::emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// Commits the open group and waits for every group of this thread.
MK_DEVICE void cp_async_wait_all() {
#if defined(MOKERNELS_EMULATION)
  ::mk::emu::cp_async_commit();
  ::mk::emu::cp_async_wait(0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#else
  __trap();
#endif
}

}  // namespace mk
