// CUDA kernels of the Hutchinson trace and the likelihood step: one block of kTraceLanes threads
// per sample, summing in the order of diffkern/trace_math.h (the CPU tests run the same sums).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../likelihood_common.h"
#include "diffkern/trace_math.h"

namespace diffkern {
namespace cuda {
namespace {

template <class T, class acc_t>
__global__ void likelihood_kernel(LikelihoodArgs a) {
  __shared__ acc_t partial[kTraceLanes];
  const int64_t n = blockIdx.x;
  const int lane = threadIdx.x;
  acc_t probe_sum = acc_t(0);
  for (int64_t k = 0; k < a.num_probes; ++k) {
    partial[lane] = trace_lane<T, acc_t>(probe_row<T>(a.probes, k, n), probe_row<T>(a.products, k, n), a.features, lane);
    __syncthreads();
    for (int stride = kTraceLanes / 2; stride > 0; stride /= 2) {
      trace_tree_level(partial, lane, stride);
      __syncthreads();
    }
    if (lane == 0) probe_sum = probe_sum + partial[0];
    __syncthreads();
  }
  if (lane == 0) likelihood_finish(a, n, static_cast<double>(probe_sum));
  if (a.x != nullptr) {
    T* x_out = static_cast<T*>(a.x_out);
    for (int64_t j = lane; j < a.features; j += kTraceLanes)
      x_out[n * a.features + j] = likelihood_x_element<T, acc_t>(a, n * a.features + j);
  }
}

void run(const LikelihoodArgs& a, const at::Device& device) {
  if (a.batch == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(a.batch <= 0x7fffffff, "diffkern::likelihood_step: batch too large for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                  "diffkern::likelihood_step", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    likelihood_kernel<scalar_t, acc_t><<<a.batch, kTraceLanes, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor probe_trace_cuda(const at::Tensor& probes, const at::Tensor& products, double scale) {
  LikelihoodCall call = prepare_probe_trace(probes, products, scale);
  run(call.args, probes.device());
  return call.trace;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> likelihood_step_cuda(DK_LIKELIHOOD_STEP_PARAMS) {
  LikelihoodCall call = prepare_likelihood_step(DK_LIKELIHOOD_STEP_ARGS);
  run(call.args, x.device());
  return {call.x_next, call.delta_next, call.trace};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("probe_trace", &probe_trace_cuda);
  m.impl("likelihood_step", &likelihood_step_cuda);
}

}  // namespace cuda
}  // namespace diffkern
