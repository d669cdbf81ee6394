// CUDA kernels of the fused training loss (diffkern/loss_math.h): one block of kLossLanes threads per
// (sample, chunk of features), each thread one lane of the per-thread body, the lanes' tree in
// shared memory, then one thread per sample adds the chunks in order; the backward is one thread
// per block of 4 features. The CPU runs the same sums in the same order.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../loss_common.h"
#include "block_tree_sum.cuh"

namespace diffkern {
namespace cuda {
namespace {

static_assert(kLossLanes == kTraceLanes, "the loss uses the trace's block tree");

template <class T, class acc_t>
__global__ void loss_chunk_kernel(LossArgs a, acc_t* chunk_sums) {
  __shared__ acc_t partial[kLossLanes];
  const int64_t n = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const int lane = threadIdx.x;
  partial[lane] = loss_lane_sum<T, acc_t>(a, loss_row<acc_t>(a, n), n, c, lane);
  block_tree_sum(partial, lane);
  if (lane == 0) chunk_sums[n * chunks + c] = partial[0];
}

template <class acc_t>
__global__ void loss_finish_kernel(LossArgs a, const acc_t* chunk_sums, int64_t chunks) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.batch) return;
  acc_t total = acc_t(0);
  for (int64_t c = 0; c < chunks; ++c) total = total + chunk_sums[n * chunks + c];
  a.loss_out[n] = loss_row<acc_t>(a, n).weight * static_cast<double>(total);
}

template <class T, class acc_t>
__global__ void loss_backward_kernel(LossArgs a, int64_t threads) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread < threads) loss_backward_block<T, acc_t>(thread, a);
}

void run(const LossArgs& a, const at::Device& device, bool backward) {
  if (a.batch == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                  "diffkern::training_loss", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (backward) {
      const int64_t threads = a.batch * ((a.features + 3) / 4);
      if (threads == 0) return;
      constexpr int kThreads = 256;
      loss_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>((threads + kThreads - 1) / kThreads), kThreads, 0,
                                              stream>>>(a, threads);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t chunks = loss_chunks(a.features);
    TORCH_CHECK(a.batch <= 0x7fffffff && chunks <= 65535, "diffkern::training_loss: batch or sample too large for one "
                "launch");
    const at::Tensor chunk_sums = at::empty({a.batch * chunks},
        at::TensorOptions().device(device).dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
    acc_t* sums = static_cast<acc_t*>(chunk_sums.mutable_data_ptr());
    loss_chunk_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(a.batch), static_cast<unsigned>(chunks)),
                                         kLossLanes, 0, stream>>>(a, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kFinishThreads = 128;
    loss_finish_kernel<acc_t><<<static_cast<unsigned>((a.batch + kFinishThreads - 1) / kFinishThreads),
                                kFinishThreads, 0, stream>>>(a, sums, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor training_loss_cuda(DK_TRAINING_LOSS_PARAMS) {
  TrainingLoss s = prepare_training_loss_forward(DK_TRAINING_LOSS_ARGS);
  run(s.args, x0.device(), false);
  return s.loss;
}

std::vector<at::Tensor> training_loss_backward_cuda(const at::Tensor& grad_loss, DK_TRAINING_LOSS_PARAMS,
                                                    std::array<bool, 3> output_mask) {
  TrainingLoss s = prepare_training_loss_backward(grad_loss, DK_TRAINING_LOSS_ARGS, output_mask);
  run(s.args, x0.device(), true);
  return s.grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("training_loss", &training_loss_cuda);
  m.impl("training_loss_backward", &training_loss_backward_cuda);
}

}  // namespace cuda
}  // namespace diffkern
