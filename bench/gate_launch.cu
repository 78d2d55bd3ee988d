// The CUDA gate kernels of csrc/cuda/gate_kernels.cuh under several launch configurations, on
// the weights of the GPU benchmarks, without torch: which block size, grid and elements per
// thread move the most bytes a second. csrc/cuda/gate_cuda.cu launches the first configuration
// (256 threads a block, one block for every 256 packs, 16 bytes of the widest operand a
// thread). Float32 w and s, bfloat16 out and G, as under bf16 autocast.
//
//   nvcc -std=c++17 -O3 -arch=sm_90 bench/gate_launch.cu -o /tmp/gate_launch && /tmp/gate_launch
//
// Prints one row per weight, kernel and configuration: microseconds per launch (median of 9
// samples of 20 launches, CUDA events) and the bytes it moves per second; fails if a
// configuration's outputs differ by a bit from the first's.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../csrc/cuda/gate_kernels.cuh"

namespace {

using csext::cuda::gate_backward_kernel;
using csext::cuda::gate_forward_kernel;
using bf16 = __nv_bfloat16;

#define CHECK(call)                                                                          \
  do {                                                                                       \
    const cudaError_t error = (call);                                                        \
    if (error != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(error));    \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

template <typename T>
__device__ unsigned long long memcmp_bits(T a, T b) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "bf16 or float");
  using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;
  return *reinterpret_cast<const Bits*>(&a) != *reinterpret_cast<const Bits*>(&b);
}

// Deterministic values in about [-2, 2]: w, s and G alike.
__global__ void fill(float* f, bf16* h, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    const float v = float(x & 0xffffff) / float(0x800000) - 1.0f;
    if (f) f[i] = 2.0f * v;
    if (h) h[i] = __float2bfloat16_rn(2.0f * v);
  }
}

// Elements where a and b differ bit for bit, added to *count.
template <typename T>
__global__ void count_differences(const T* a, const T* b, int64_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    local += memcmp_bits(a[i], b[i]);
  }
  if (local) atomicAdd(count, local);
}

// True, after saying where, if the elements counted into *counter (zero before) differ; zeroes it.
bool differed(unsigned long long* counter, const char* what, const char* configuration) {
  unsigned long long differing = 0;
  CHECK(cudaMemcpy(&differing, counter, sizeof(differing), cudaMemcpyDeviceToHost));
  CHECK(cudaMemset(counter, 0, sizeof(differing)));
  if (differing) {
    std::fprintf(stderr, "%s, %s: %llu elements differ from the first configuration's\n", what, configuration,
                 differing);
  }
  return differing != 0;
}

struct Config {
  const char* name;
  int threads;
  int blocks_per_sm;  // the grid's cap, per multiprocessor; 0: one pack per thread, no loop
  bool half_vec;      // 8 bytes of the narrowest operand a thread instead of 16
};

int grid_for(int64_t packs, const Config& c, int multiprocessors) {
  int64_t blocks = (packs + c.threads - 1) / c.threads;
  if (c.blocks_per_sm > 0) blocks = std::min<int64_t>(blocks, int64_t(multiprocessors) * c.blocks_per_sm);
  return int(std::max<int64_t>(blocks, 1));
}

template <typename Launch>
float median_us(Launch launch) {
  cudaEvent_t start, end;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&end));
  for (int i = 0; i < 5; ++i) launch();  // warm-up
  std::vector<float> samples;
  for (int s = 0; s < 9; ++s) {
    CHECK(cudaEventRecord(start));
    for (int i = 0; i < 20; ++i) launch();
    CHECK(cudaEventRecord(end));
    CHECK(cudaEventSynchronize(end));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, start, end));
    samples.push_back(ms * 1e3f / 20);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(end));
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

}  // namespace

int main() {
  int device = 0, multiprocessors = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("%s, %d multiprocessors; float32 w and s, bfloat16 out and G\n", prop.name, multiprocessors);

  const Config configs[] = {
      {"as csext (256 thr, no cap, half vec)", 256, 0, true},
      {"256 thr, cap 8/SM", 256, 8, false},
      {"256 thr, no cap", 256, 0, false},
      {"128 thr, no cap", 128, 0, false},
      {"512 thr, no cap", 512, 0, false},
      {"256 thr, cap 4/SM", 256, 4, false},
      {"128 thr, no cap, half vec", 128, 0, true},
  };
  struct Weight {
    const char* name;
    int64_t n;
  };
  const Weight weights[] = {{"linear 4096x4096", 4096LL * 4096}, {"conv 512x512x3x3", 512LL * 512 * 9},
                            {"conv 256x256x3x3", 256LL * 256 * 9}};
  const int64_t most = weights[0].n;
  float *w, *s, *dw, *ds, *ref_dw, *ref_ds;
  bf16 *g, *out, *ref_out;
  unsigned long long* differences;
  CHECK(cudaMalloc(&w, most * sizeof(float)));
  CHECK(cudaMalloc(&s, most * sizeof(float)));
  CHECK(cudaMalloc(&dw, most * sizeof(float)));
  CHECK(cudaMalloc(&ds, most * sizeof(float)));
  CHECK(cudaMalloc(&g, most * sizeof(bf16)));
  CHECK(cudaMalloc(&out, most * sizeof(bf16)));
  CHECK(cudaMalloc(&ref_dw, most * sizeof(float)));
  CHECK(cudaMalloc(&ref_ds, most * sizeof(float)));
  CHECK(cudaMalloc(&ref_out, most * sizeof(bf16)));
  CHECK(cudaMalloc(&differences, sizeof(unsigned long long)));
  CHECK(cudaMemset(differences, 0, sizeof(unsigned long long)));
  fill<<<1024, 256>>>(w, nullptr, most, 1u);
  fill<<<1024, 256>>>(s, nullptr, most, 2u);
  fill<<<1024, 256>>>(nullptr, g, most, 3u);
  CHECK(cudaDeviceSynchronize());

  const float beta = 4.0f, penalty = 1e-4f;
  std::printf("| weight | kernel | configuration | us | TB/s |\n|---|---|---|---|---|\n");
  for (const Weight& weight : weights) {
    const int64_t n = weight.n;
    for (const Config& c : configs) {
      // forward: 4 + 4 bytes read, 2 written an element; backward: 2 + 4 + 4 read, 4 + 4 written
      const int grid = grid_for(n / (c.half_vec ? 4 : 8) + 1, c, multiprocessors);
      CHECK(cudaMemset(out, 0, n * sizeof(bf16)));
      CHECK(cudaMemset(dw, 0, n * sizeof(float)));
      CHECK(cudaMemset(ds, 0, n * sizeof(float)));
      const float forward = median_us([&] {
        if (c.half_vec) {
          gate_forward_kernel<float, float, bf16, 4><<<grid, c.threads>>>(w, s, out, n, beta, false);
        } else {
          gate_forward_kernel<float, float, bf16, 8><<<grid, c.threads>>>(w, s, out, n, beta, false);
        }
      });
      const float backward = median_us([&] {
        if (c.half_vec) {
          gate_backward_kernel<float, float, bf16, 4><<<grid, c.threads>>>(g, w, s, dw, ds, n, beta, penalty);
        } else {
          gate_backward_kernel<float, float, bf16, 8><<<grid, c.threads>>>(g, w, s, dw, ds, n, beta, penalty);
        }
      });
      // Every configuration must write what the first wrote, bit for bit (the same math per element).
      if (&c == &configs[0]) {
        CHECK(cudaMemcpy(ref_out, out, n * sizeof(bf16), cudaMemcpyDeviceToDevice));
        CHECK(cudaMemcpy(ref_dw, dw, n * sizeof(float), cudaMemcpyDeviceToDevice));
        CHECK(cudaMemcpy(ref_ds, ds, n * sizeof(float), cudaMemcpyDeviceToDevice));
      }
      count_differences<<<1024, 256>>>(out, ref_out, n, differences);
      count_differences<<<1024, 256>>>(dw, ref_dw, n, differences);
      count_differences<<<1024, 256>>>(ds, ref_ds, n, differences);
      if (differed(differences, weight.name, c.name)) return 1;
      std::printf("| %s | forward | %s | %.1f | %.2f |\n", weight.name, c.name, forward, 10.0 * n / forward / 1e6);
      std::printf("| %s | backward | %s | %.1f | %.2f |\n", weight.name, c.name, backward, 18.0 * n / backward / 1e6);
    }
  }

  for (void* p : {static_cast<void*>(w), static_cast<void*>(s), static_cast<void*>(dw), static_cast<void*>(ds),
                  static_cast<void*>(g), static_cast<void*>(out), static_cast<void*>(ref_dw),
                  static_cast<void*>(ref_ds), static_cast<void*>(ref_out), static_cast<void*>(differences)}) {
    CHECK(cudaFree(p));
  }
  return 0;
}
