// CPU kernel of the widened fused step (diffkern/linear_step.h): the SIMD units when the CPU has
// them, otherwise the per-thread body run index by index (exactly what a CUDA thread runs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../ops_common.h"
#include "diffkern/linear_step.h"
#include "isa_dispatch.h"

namespace diffkern {
namespace cpu {
namespace {
void run_linear_step(const LinearStepArgs& a, Isa isa);
}  // namespace

void linear_step_out_kernel(DK_LINEAR_STEP_PARAMS, at::TensorList out) {
  TORCH_CHECK(inputs.empty() || inputs[0].device().is_cpu(), "diffkern::linear_step: CPU kernel called for ",
              inputs[0].device());
  LinearStep s = prepare_linear_step(DK_LINEAR_STEP_ARGS, &out);
  run_linear_step(s.args, best_isa());
}

namespace {

void run_linear_step(const LinearStepArgs& a, Isa isa) {
  if (a.batch == 0 || a.features == 0) return;
  if (isa == Isa::kScalar) {
    const int64_t threads = a.batch * ((a.features + 3) / 4);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                    "diffkern::linear_step", [&] {
                                      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
                                      at::parallel_for(0, threads, 2048, [&](int64_t begin, int64_t end) {
                                        for (int64_t t = begin; t < end; ++t) linear_step_block<scalar_t, acc_t>(t, a);
                                      });
                                    });
    return;
  }
  const StepItems items = StepItems::of(a.batch, a.features);
  const int64_t grain = std::max<int64_t>(1, 32768 / kCpuStepChunk);
  at::parallel_for(0, items.count, grain, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) {
      linear_step_avx512(a, begin, end);
    } else {
      linear_step_avx2(a, begin, end);
    }
  });
}

std::vector<at::Tensor> linear_step_on(Isa isa, DK_LINEAR_STEP_PARAMS) {
  TORCH_CHECK(inputs.empty() || inputs[0].device().is_cpu(), "diffkern::linear_step: CPU kernel called for ",
              inputs[0].device());
  LinearStep s = prepare_linear_step(DK_LINEAR_STEP_ARGS);
  run_linear_step(s.args, isa);
  return s.outputs;
}

std::vector<at::Tensor> linear_step_cpu(DK_LINEAR_STEP_PARAMS) { return linear_step_on(best_isa(), DK_LINEAR_STEP_ARGS); }

// Test hook: the same op on a chosen instruction set ("scalar" is the CUDA thread body).
std::vector<at::Tensor> linear_step_cpu_isa(DK_LINEAR_STEP_PARAMS, c10::string_view isa) {
  return linear_step_on(isa_from_name(std::string(isa).c_str()), DK_LINEAR_STEP_ARGS);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("linear_step", &linear_step_cpu);
  m.impl("linear_step.out", &linear_step_out_kernel);
  m.impl("_linear_step_cpu_isa", &linear_step_cpu_isa);
}

}  // namespace cpu

void linear_step_out_direct(DK_LINEAR_STEP_PARAMS, at::TensorList out) {
#ifdef DK_WITH_CUDA
  if (!inputs.empty() && inputs[0].device().is_cuda()) {
    cuda::linear_step_out_kernel(DK_LINEAR_STEP_ARGS, out);
    return;
  }
#endif
  cpu::linear_step_out_kernel(DK_LINEAR_STEP_ARGS, out);
}

}  // namespace diffkern
