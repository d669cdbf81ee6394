// CPU kernel of the fused step: the SIMD units (simd/step_simd.h) when the CPU has them, otherwise
// the per-thread body of diffkern/step_body.h run index by index (exactly what a CUDA thread runs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include "../ops_common.h"
#include "diffkern/step_backward.h"
#include "diffkern/step_body.h"
#include "isa_dispatch.h"

namespace diffkern {
namespace cpu {
namespace {
void run_fused_step(const FusedStepArgs& a, Isa isa);
}  // namespace

void fused_step_out_kernel(DK_FUSED_STEP_PARAMS, at::Tensor& out, const std::optional<at::Tensor>& aux_out) {
  TORCH_CHECK(x.device().is_cpu(), "diffkern::fused_step: CPU kernel called for ", x.device());
  FusedStep s = prepare_fused_step(DK_FUSED_STEP_ARGS, &out, aux_out.has_value() ? &*aux_out : nullptr);
  run_fused_step(s.args, best_isa());
}

namespace {

void check_row_indices(const FusedStepArgs& a) {
  if (a.rows == nullptr) return;
  // min and max first (a loop the compiler vectorises); the offending index only on failure
  int64_t lo = 0, hi = 0;
  if (a.rows_size > 0) lo = hi = a.rows[0];
  for (int64_t i = 0; i < a.rows_size; ++i) {
    lo = std::min(lo, a.rows[i]);
    hi = std::max(hi, a.rows[i]);
  }
  if (lo >= 0 && hi < a.table_rows) return;
  for (int64_t i = 0; i < a.rows_size; ++i)
    TORCH_CHECK(a.rows[i] >= 0 && a.rows[i] < a.table_rows, "diffkern::fused_step: rows[", i, "] = ", a.rows[i],
                " outside the table of ", a.table_rows, " rows");
}

template <class T, class acc_t>
void fused_step_scalar(const FusedStepArgs& a) {
  const int64_t threads = a.batch * ((a.features + 3) / 4);
  at::parallel_for(0, threads, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) {
      const int64_t sample = thread / ((a.features + 3) / 4);
      fused_step_block<T, acc_t>(thread, a, step_row_for<acc_t>(a, step_row_index(a, sample)));
    }
  });
}

void run_fused_step(const FusedStepArgs& a, Isa isa) {
  check_row_indices(a);
  if (a.batch == 0 || a.features == 0) return;
  if (isa == Isa::kScalar) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                    "diffkern::fused_step", [&] {
                                      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
                                      fused_step_scalar<scalar_t, acc_t>(a);
                                    });
    return;
  }
  const StepItems items = StepItems::of(a.batch, a.features);
  // About 32K elements per task, so small steps stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / kCpuStepChunk);
  at::parallel_for(0, items.count, grain, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) {
      fused_step_avx512(a, begin, end);
    } else {
      fused_step_avx2(a, begin, end);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_step_on(Isa isa, DK_FUSED_STEP_PARAMS) {
  TORCH_CHECK(x.device().is_cpu(), "diffkern::fused_step: CPU kernel called for ", x.device());
  FusedStep s = prepare_fused_step(DK_FUSED_STEP_ARGS);
  run_fused_step(s.args, isa);
  return {s.out, s.aux};
}

std::tuple<at::Tensor, at::Tensor> fused_step_cpu(DK_FUSED_STEP_PARAMS) {
  return fused_step_on(best_isa(), DK_FUSED_STEP_ARGS);
}

std::vector<at::Tensor> fused_step_backward_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_aux,
                                                DK_FUSED_STEP_PARAMS, std::array<bool, 6> output_mask) {
  TORCH_CHECK(x.device().is_cpu(), "diffkern::fused_step_backward: CPU kernel called for ", x.device());
  FusedStepBackward s = prepare_fused_step_backward(grad_out, grad_aux, DK_FUSED_STEP_ARGS, output_mask);
  const FusedStepArgs& a = s.args.step;
  check_row_indices(a);
  const int64_t blocks_per_row = (a.features + 3) / 4;
  const int64_t threads = a.batch * blocks_per_row;
  if (threads == 0) return s.grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffkern::fused_step_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, threads, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t thread = begin; thread < end; ++thread)
        fused_step_backward_block<scalar_t, acc_t>(thread, s.args,
                                                    step_row_for<acc_t>(a, step_row_index(a, thread / blocks_per_row)));
    });
  });
  return s.grads;
}

// Test hook: the same op on a chosen instruction set ("scalar" is the CUDA thread body).
std::tuple<at::Tensor, at::Tensor> fused_step_cpu_isa(DK_FUSED_STEP_PARAMS, c10::string_view isa) {
  return fused_step_on(isa_from_name(std::string(isa).c_str()), DK_FUSED_STEP_ARGS);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("fused_step", &fused_step_cpu);
  m.impl("fused_step.out", &fused_step_out_kernel);
  m.impl("_fused_step_cpu_isa", &fused_step_cpu_isa);
  m.impl("fused_step_backward", &fused_step_backward_cpu);
}

}  // namespace cpu

void fused_step_out_direct(DK_FUSED_STEP_PARAMS, at::Tensor& out, const std::optional<at::Tensor>& aux_out) {
#ifdef DK_WITH_CUDA
  if (x.device().is_cuda()) {
    cuda::fused_step_out_kernel(DK_FUSED_STEP_ARGS, out, aux_out);
    return;
  }
#endif
  cpu::fused_step_out_kernel(DK_FUSED_STEP_ARGS, out, aux_out);
}

}  // namespace diffkern
