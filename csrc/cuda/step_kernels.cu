// CUDA kernel of the fused step: a thin __global__ around the shared per-thread body
// (diffkern/step_body.h), which the CPU tests also run index by index.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../ops_common.h"
#include "diffkern/step_backward.h"
#include "diffkern/step_body.h"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;

template <class T, class acc_t>
__global__ void fused_step_kernel(FusedStepArgs a, int64_t threads) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= threads) return;
  const int64_t index = step_row_index(a, thread / ((a.features + 3) / 4));
  CUDA_KERNEL_ASSERT(index >= 0 && index < a.table_rows);
  fused_step_block<T, acc_t>(thread, a, step_row_for<acc_t>(a, index));
}

template <class T, class acc_t>
__global__ void fused_step_backward_kernel(FusedStepBackwardArgs b, int64_t threads) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= threads) return;
  const int64_t index = step_row_index(b.step, thread / ((b.step.features + 3) / 4));
  CUDA_KERNEL_ASSERT(index >= 0 && index < b.step.table_rows);
  fused_step_backward_block<T, acc_t>(thread, b, step_row_for<acc_t>(b.step, index));
}

void launch_fused_step(const FusedStepArgs& args, at::ScalarType dtype) {
  const int64_t threads = args.batch * ((args.features + 3) / 4);
  if (threads == 0) return;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "diffkern::fused_step: tensor too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diffkern::fused_step", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fused_step_kernel<scalar_t, acc_t><<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(args, threads);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> fused_step_cuda(DK_FUSED_STEP_PARAMS) {
  TORCH_CHECK(x.device().is_cuda(), "diffkern::fused_step: CUDA kernel called for ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  FusedStep s = prepare_fused_step(DK_FUSED_STEP_ARGS);
  launch_fused_step(s.args, x.scalar_type());
  return {s.out, s.aux};
}

std::vector<at::Tensor> fused_step_backward_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_aux,
                                                 DK_FUSED_STEP_PARAMS, std::array<bool, 6> output_mask) {
  TORCH_CHECK(x.device().is_cuda(), "diffkern::fused_step_backward: CUDA kernel called for ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  FusedStepBackward s = prepare_fused_step_backward(grad_out, grad_aux, DK_FUSED_STEP_ARGS, output_mask);
  const int64_t threads = s.args.step.batch * ((s.args.step.features + 3) / 4);
  if (threads == 0) return s.grads;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "diffkern::fused_step_backward: tensor too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffkern::fused_step_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    fused_step_backward_kernel<scalar_t, acc_t>
        <<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(s.args, threads);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s.grads;
}

}  // namespace

void fused_step_out_kernel(DK_FUSED_STEP_PARAMS, at::Tensor& out, const std::optional<at::Tensor>& aux_out) {
  TORCH_CHECK(x.device().is_cuda(), "diffkern::fused_step: CUDA kernel called for ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  FusedStep s = prepare_fused_step(DK_FUSED_STEP_ARGS, &out, aux_out.has_value() ? &*aux_out : nullptr);
  launch_fused_step(s.args, x.scalar_type());
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("fused_step", &fused_step_cuda);
  m.impl("fused_step.out", &fused_step_out_kernel);
  m.impl("fused_step_backward", &fused_step_backward_cuda);
}

}  // namespace cuda
}  // namespace diffkern
