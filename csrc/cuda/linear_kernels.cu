// CUDA kernel of the widened fused step: a thin __global__ around the shared per-thread body
// (diffkern/linear_step.h), which the CPU tests also run index by index.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../ops_common.h"
#include "diffkern/linear_step.h"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;

template <class T, class acc_t>
__global__ void linear_step_kernel(LinearStepArgs a, int64_t threads) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread >= threads) return;
  linear_step_block<T, acc_t>(thread, a);
}

void launch_linear_step(const LinearStepArgs& args, at::ScalarType dtype) {
  const int64_t threads = args.batch * ((args.features + 3) / 4);
  if (threads == 0) return;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "diffkern::linear_step: tensor too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diffkern::linear_step", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    linear_step_kernel<scalar_t, acc_t><<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(args, threads);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> linear_step_cuda(DK_LINEAR_STEP_PARAMS) {
  TORCH_CHECK(!inputs.empty() && inputs[0].device().is_cuda(), "diffkern::linear_step: CUDA kernel called for CPU tensors");
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  LinearStep s = prepare_linear_step(DK_LINEAR_STEP_ARGS);
  launch_linear_step(s.args, inputs[0].scalar_type());
  return s.outputs;
}

}  // namespace

void linear_step_out_kernel(DK_LINEAR_STEP_PARAMS, at::TensorList out) {
  TORCH_CHECK(!inputs.empty() && inputs[0].device().is_cuda(), "diffkern::linear_step: CUDA kernel called for CPU tensors");
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  LinearStep s = prepare_linear_step(DK_LINEAR_STEP_ARGS, &out);
  launch_linear_step(s.args, inputs[0].scalar_type());
}

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("linear_step", &linear_step_cuda);
  m.impl("linear_step.out", &linear_step_out_kernel);
}

}  // namespace cuda
}  // namespace diffkern
