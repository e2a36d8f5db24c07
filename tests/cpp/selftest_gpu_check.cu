// Runs the emulator self-test kernels of csrc/emu/selftest_kernels.cuh (their correct modes) on a GPU
// and checks them against host references: the same source the emulator runs, so the cp.async
// wrappers' PTX and the 2-warp ldmatrix + mma.sync GEMM are checked on hardware. Prints "OK <checks>"
// and exits 0 when every output matches exactly. Built and run by tests/test_emu.py (a `cuda` test):
//   nvcc -std=c++20 -arch=sm_80 --expt-relaxed-constexpr -Icsrc tests/cpp/selftest_gpu_check.cu
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "emu/selftest_kernels.cuh"

#define CHECK(x)                                                                  \
  do {                                                                            \
    cudaError_t e_ = (x);                                                         \
    if (e_ != cudaSuccess) {                                                      \
      std::printf("CUDA error %s at line %d\n", cudaGetErrorString(e_), __LINE__); \
      std::exit(2);                                                               \
    }                                                                             \
  } while (0)

namespace {

int failures = 0, checks = 0;

void expect_equal(const char* what, const std::vector<float>& got, const std::vector<float>& want) {
  ++checks;
  for (size_t i = 0; i < want.size(); ++i)
    if (got[i] != want[i]) {
      std::printf("MISMATCH %s at %zu: %g vs %g\n", what, i, got[i], want[i]);
      ++failures;
      return;
    }
}

// out = kernel(x) with 64 threads, one block.
template <class Launch> std::vector<float> run(const std::vector<float>& x, size_t n_out, Launch launch) {
  float *dx, *dout;
  CHECK(cudaMalloc(&dx, x.size() * sizeof(float)));
  CHECK(cudaMalloc(&dout, n_out * sizeof(float)));
  CHECK(cudaMemcpy(dx, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(dout, 0, n_out * sizeof(float)));
  launch(dx, dout);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> out(n_out);
  CHECK(cudaMemcpy(out.data(), dout, n_out * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaFree(dx));
  CHECK(cudaFree(dout));
  return out;
}

}  // namespace

int main() {
  using namespace mk::selftest;
  const int stages = 4;
  std::vector<float> x(stages * 256);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 1009) - 504.f;

  std::vector<float> pipe(x.size());
  for (int s = 0; s < stages; ++s)
    for (int i = 0; i < 256; ++i) pipe[s * 256 + i] = x[s * 256 + (i + 4) % 256];
  for (int mode : {0, 4}) {
    auto check = [&](const char* what, auto kernel) {
      expect_equal(what, run(x, x.size(), [&](float* dx, float* dout) { kernel<<<1, 64>>>(dx, dout, stages, mode); }),
                   pipe);
    };
    check("pipeline ca4", cp_async_pipeline_kernel<4, false>);
    check("pipeline ca8", cp_async_pipeline_kernel<8, false>);
    check("pipeline ca16", cp_async_pipeline_kernel<16, false>);
    check("pipeline cg16", cp_async_pipeline_kernel<16, true>);
  }

  std::vector<float> xz(x.begin(), x.begin() + 256), zfill(256);
  for (int t = 0; t < 64; ++t)
    for (int i = 0; i < 4; ++i) zfill[4 * t + i] = i < t % 5 ? xz[4 * t + i] : 0.f;
  expect_equal("zfill", run(xz, 256, [](float* dx, float* dout) { cp_async_zfill_kernel<<<1, 64>>>(dx, dout, false); }),
               zfill);

  // C[32, 16] = A[32, K] · B[16, K]^T with small integers (exact in fp16 and fp32).
  const int K = 32;
  std::vector<float> ab(48 * K), c(32 * 16, 0.f);
  for (size_t i = 0; i < ab.size(); ++i) ab[i] = static_cast<float>(static_cast<int>((i * 31) % 9) - 4);
  for (int m = 0; m < 32; ++m)
    for (int n = 0; n < 16; ++n)
      for (int k = 0; k < K; ++k) c[m * 16 + n] += ab[m * K + k] * ab[32 * K + n * K + k];
  expect_equal("two_warp_gemm",
               run(ab, c.size(), [&](float* dx, float* dout) { two_warp_gemm_kernel<<<1, 64>>>(dx, dx + 32 * K, dout, K, 0); }),
               c);

  if (failures) {
    std::printf("FAILED %d of %d\n", failures, checks);
    return 1;
  }
  std::printf("OK %d\n", checks);
  return 0;
}
