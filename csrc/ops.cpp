// The schemas of every csext op and the CPU kernels of csext::gate and csext::gate_backward (the
// checks they share with the CUDA kernels of csrc/cuda are in gate_checks.h). Fake and vmap
// registrations live in csext/backends/aten.py, the autograd in autograd.cpp, the Python module in
// fast_path.cpp; the math is csext/reference.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "gate_checks.h"
#include "gate_cpu.h"
#include "op_tags.h"

namespace csext {
namespace {

// One build runs at the best vector width of the machine it loads on (chosen once, by ifunc).
// Levels, not CPU models: a virtualised "Intel Xeon Processor" fails every model test.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CSEXT_ISA_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CSEXT_ISA_CLONES
#endif

using at::ScalarType;
constexpr int64_t kGrainSize = 1 << 15;  // elements per task: enough to hide a thread wake-up

bool is_pair(ScalarType a, ScalarType b, ScalarType want_a, ScalarType want_b) {
  return a == want_a && b == want_b;
}

// Forward loop (w_eff = w * m) for every (input, output) dtype pair; the loops are inlined here,
// so each ISA clone of this function carries its own vectorized copy of them.
CSEXT_ISA_CLONES void gate_forward_kernel(ScalarType in_type, ScalarType out_type, const void* in,
                                          const void* mask_logits, void* out, int64_t n,
                                          int64_t cols, double beta, bool hard) {
  using cpu::bf16;
  const float* s = static_cast<const float*>(mask_logits);
  const float b = static_cast<float>(beta);
#define CSEXT_FORWARD_CASE(IN_ST, IN_T, OUT_ST, OUT_T)                                         \
  if (is_pair(in_type, out_type, ScalarType::IN_ST, ScalarType::OUT_ST))                       \
    return cpu::gate_forward_any<float>(static_cast<const IN_T*>(in), s,                       \
                                        static_cast<OUT_T*>(out), n, cols, b, hard);
  CSEXT_FORWARD_CASE(Float, float, Float, float)
  CSEXT_FORWARD_CASE(Float, float, BFloat16, bf16)
  CSEXT_FORWARD_CASE(Float, float, Half, c10::Half)
  CSEXT_FORWARD_CASE(BFloat16, bf16, BFloat16, bf16)
  CSEXT_FORWARD_CASE(BFloat16, bf16, Float, float)
  CSEXT_FORWARD_CASE(BFloat16, bf16, Half, c10::Half)
  CSEXT_FORWARD_CASE(Half, c10::Half, Half, c10::Half)
  CSEXT_FORWARD_CASE(Half, c10::Half, Float, float)
  CSEXT_FORWARD_CASE(Half, c10::Half, BFloat16, bf16)
#undef CSEXT_FORWARD_CASE
  TORCH_INTERNAL_ASSERT(in_type == ScalarType::Double && out_type == ScalarType::Double);
  cpu::gate_forward_any<double>(static_cast<const double*>(in),
                                static_cast<const double*>(mask_logits),
                                static_cast<double*>(out), n, cols, beta, hard);
}

// Soft-gate backward for every (weight, grad) dtype pair.
CSEXT_ISA_CLONES void gate_backward_kernel(ScalarType weight_type, ScalarType grad_type,
                                           const void* grad, const void* weight,
                                           const void* mask_logits, void* grad_weight,
                                           void* grad_mask_logits, int64_t n, int64_t cols,
                                           double beta, double penalty) {
  using cpu::bf16;
  const float* s = static_cast<const float*>(mask_logits);
  float* ds = static_cast<float*>(grad_mask_logits);
  const float b = static_cast<float>(beta);
  const float lam = static_cast<float>(penalty);
#define CSEXT_BACKWARD_CASE(W_ST, W_T, G_ST, G_T)                                            \
  if (is_pair(weight_type, grad_type, ScalarType::W_ST, ScalarType::G_ST))                   \
    return cpu::gate_backward_any<float>(static_cast<const G_T*>(grad),                      \
                                         static_cast<const W_T*>(weight), s,                 \
                                         static_cast<W_T*>(grad_weight), ds, n, cols, b, lam);
  CSEXT_BACKWARD_CASE(Float, float, Float, float)
  CSEXT_BACKWARD_CASE(Float, float, BFloat16, bf16)
  CSEXT_BACKWARD_CASE(Float, float, Half, c10::Half)
  CSEXT_BACKWARD_CASE(BFloat16, bf16, BFloat16, bf16)
  CSEXT_BACKWARD_CASE(BFloat16, bf16, Float, float)
  CSEXT_BACKWARD_CASE(BFloat16, bf16, Half, c10::Half)
  CSEXT_BACKWARD_CASE(Half, c10::Half, Half, c10::Half)
  CSEXT_BACKWARD_CASE(Half, c10::Half, Float, float)
  CSEXT_BACKWARD_CASE(Half, c10::Half, BFloat16, bf16)
#undef CSEXT_BACKWARD_CASE
  TORCH_INTERNAL_ASSERT(weight_type == ScalarType::Double && grad_type == ScalarType::Double);
  cpu::gate_backward_any<double>(
      static_cast<const double*>(grad), static_cast<const double*>(weight),
      static_cast<const double*>(mask_logits), static_cast<double*>(grad_weight),
      static_cast<double*>(grad_mask_logits), n, cols, beta, penalty);
}

// fn(first weight, weights, first logit) over chunks of whole rows of `cols` weights per logit.
template <typename Fn>
void parallel_chunks(int64_t n, int64_t cols, const Fn& fn) {
  const int64_t rows = n / cols;
  const int64_t grain = std::max<int64_t>(1, kGrainSize / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    fn(begin * cols, (end - begin) * cols, cols == 1 ? begin * cols : begin);
  });
}

// A fresh output tensor. Large ones are mapped with transparent huge pages where the kernel
// allows it (THP "madvise" mode): first touch of a 64 MiB weight-sized buffer otherwise costs
// 16k page faults, more than the kernel's own work.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat layout) {
  at::Tensor out = at::empty(sizes, options.memory_format(layout));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t{1} << 21;
  const size_t bytes = out.nbytes();
  if (bytes >= 2 * kHugePage) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t first = (begin + page - 1) & ~(page - 1);
    const uintptr_t last = (begin + bytes) & ~(page - 1);
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
  }
#endif
  return out;
}

const char* at_offset(const at::Tensor& t, int64_t i) {
  return static_cast<const char*>(t.const_data_ptr()) + i * t.element_size();
}
char* at_offset_mut(at::Tensor& t, int64_t i) {
  return static_cast<char*>(t.mutable_data_ptr()) + i * t.element_size();
}

at::Tensor gate_cpu(const at::Tensor& weight, const at::Tensor& mask_logits,
                    const at::Tensor& beta_tensor, bool hard, double penalty,
                    std::optional<ScalarType> dtype) {
  (void)penalty;  // used by the backward only
  const double beta = read_beta("csext::gate", beta_tensor);
  check_gate_args("csext::gate", "weight", weight, mask_logits, beta);
  const int64_t cols = weights_per_logit("csext::gate", "weight", weight, mask_logits);
  TORCH_CHECK(weight.device().is_cpu(), "csext::gate: the CPU kernel got a tensor on ",
              weight.device());
  const ScalarType out_type = gate_output_type(weight, dtype);
  const at::MemoryFormat layout = common_layout({weight, mask_logits});
  const at::Tensor w = weight.contiguous(layout);
  const at::Tensor s = mask_logits.contiguous(layout);
  at::Tensor out = empty_output(w.sizes(), w.options().dtype(out_type), layout);
  parallel_chunks(w.numel(), cols, [&](int64_t begin, int64_t count, int64_t logit) {
    gate_forward_kernel(w.scalar_type(), out_type, at_offset(w, begin), at_offset(s, logit),
                        at_offset_mut(out, begin), count, cols, beta, hard);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cpu(const at::Tensor& grad,
                                                     const at::Tensor& weight,
                                                     const at::Tensor& mask_logits,
                                                     const at::Tensor& beta_tensor,
                                                     double penalty) {
  const double beta = read_beta("csext::gate_backward", beta_tensor);
  check_gate_backward_args(grad, weight, mask_logits, beta, penalty);
  const int64_t cols = weights_per_logit("csext::gate_backward", "weight", weight, mask_logits);
  TORCH_CHECK(weight.device().is_cpu() && grad.device().is_cpu(),
              "csext::gate_backward: the CPU kernel got tensors on ", grad.device(), " and ",
              weight.device());
  const at::MemoryFormat layout = common_layout({grad, weight, mask_logits});
  const at::Tensor g = grad.contiguous(layout);
  const at::Tensor w = weight.contiguous(layout);
  const at::Tensor s = mask_logits.contiguous(layout);
  at::Tensor grad_weight = empty_output(w.sizes(), w.options(), layout);
  at::Tensor grad_mask_logits = empty_output(s.sizes(), s.options(), layout);
  parallel_chunks(w.numel(), cols, [&](int64_t begin, int64_t count, int64_t logit) {
    gate_backward_kernel(w.scalar_type(), g.scalar_type(), at_offset(g, begin),
                         at_offset(w, begin), at_offset(s, logit),
                         at_offset_mut(grad_weight, begin), at_offset_mut(grad_mask_logits, logit),
                         count, cols, beta, penalty);
  });
  return {grad_weight, grad_mask_logits};
}

}  // namespace

TORCH_LIBRARY(csext, m) {
  // w_eff = weight * m in `dtype` (default: weight's). `penalty` (lam) enters the backward only:
  // dL/ds gains beta * m * (1 - m) * lam, the gradient of lam * sum(m). beta is a 0-dim CPU
  // tensor (see read_beta). mask_logits has weight's shape, or (rows, 1, ...): one logit per
  // leading row, m broadcast over the row (and lam counted once per weight of it).
  m.def(
      "gate(Tensor weight, Tensor mask_logits, Tensor beta, bool hard=False, float penalty=0.0, "
      "ScalarType? dtype=None) -> Tensor",
      kTags);
  // (dL/dw, dL/ds) of the soft gate from grad = dL/dw_eff.
  m.def(
      "gate_backward(Tensor grad, Tensor weight, Tensor mask_logits, Tensor beta, "
      "float penalty=0.0) -> (Tensor, Tensor)",
      kTags);
  // linear(input, gate(weight, mask_logits, ...), bias) and conv2d(...) likewise: x and the
  // gated weight in `dtype` (default weight's), bias cast to it; gradients as the composition's.
  m.def(
      "gated_linear(Tensor input, Tensor weight, Tensor mask_logits, Tensor beta, Tensor? bias, "
      "bool hard=False, float penalty=0.0, ScalarType? dtype=None) -> Tensor",
      kTags);
  m.def(
      "gated_conv2d(Tensor input, Tensor weight, Tensor mask_logits, Tensor beta, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, bool hard=False, "
      "float penalty=0.0, ScalarType? dtype=None) -> Tensor",
      kTags);
}

TORCH_LIBRARY_IMPL(csext, CPU, m) {
  m.impl("gate", &gate_cpu);
  m.impl("gate_backward", &gate_backward_cpu);
}

}  // namespace csext

