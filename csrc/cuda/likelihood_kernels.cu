// CUDA kernels of the Hutchinson trace and the likelihood step: one block of kTraceLanes threads
// per (sample, chunk of features), then one thread per sample adds the chunks, in the order of
// diffkern/trace_math.h (the CPU runs the same sums).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../likelihood_common.h"
#include "block_tree_sum.cuh"
#include "diffkern/trace_math.h"

namespace diffkern {
namespace cuda {
namespace {

// Sample n's probe sum over features [first, last) in the documented order (valid in lane 0).
template <class T, class acc_t>
__device__ acc_t block_probe_sum(const ProbeView& probes, const ProbeView& products, int64_t num_probes, int64_t n,
                                 int64_t first, int64_t last, acc_t* partial) {
  const int lane = threadIdx.x;
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < num_probes; ++k) {
    partial[lane] = trace_lane<T, acc_t>(probe_row<T>(probes, k, n), probe_row<T>(products, k, n), first, last, lane);
    block_tree_sum(partial, lane);
    if (lane == 0) sum = sum + partial[0];
    __syncthreads();
  }
  return sum;
}

// Block (n, c): sample n's chunk c. Its sum over probes goes to chunk_sums[n * chunks + c], and it
// writes the likelihood-ODE update of the chunk's features.
template <class T, class acc_t>
__global__ void trace_chunk_kernel(LikelihoodArgs a, acc_t* chunk_sums) {
  __shared__ acc_t partial[kTraceLanes];
  const int64_t n = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const int lane = threadIdx.x;
  const int64_t first = c * kTraceChunk, last = min(a.features, first + kTraceChunk);
  const acc_t chunk_sum = block_probe_sum<T, acc_t>(a.probes, a.products, a.num_probes, n, first, last, partial);
  if (lane == 0) chunk_sums[n * chunks + c] = chunk_sum;
  if (a.x != nullptr) {
    T* x_out = static_cast<T*>(a.x_out);
    for (int64_t j = first + lane; j < last; j += kTraceLanes)
      x_out[n * a.features + j] = likelihood_x_element<T, acc_t>(a, n * a.features + j);
  }
}

// Thread n: sample n's chunk sums in increasing order, then the trace and the log-density update.
template <class acc_t>
__global__ void trace_finish_kernel(LikelihoodArgs a, const acc_t* chunk_sums, int64_t chunks) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.batch) return;
  acc_t total = acc_t(0);
  for (int64_t c = 0; c < chunks; ++c) total = total + chunk_sums[n * chunks + c];
  likelihood_finish(a, n, static_cast<double>(total));
}

void run(const LikelihoodArgs& a, const at::Device& device) {
  if (a.batch == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const int64_t chunks = trace_chunks(a.features);
  TORCH_CHECK(a.batch <= 0x7fffffff && chunks <= 65535, "diffkern::likelihood_step: batch or sample too large for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                  "diffkern::likelihood_step", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor chunk_sums = at::empty({a.batch * chunks},
        at::TensorOptions().device(device).dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
    acc_t* sums = static_cast<acc_t*>(chunk_sums.mutable_data_ptr());
    trace_chunk_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(a.batch), static_cast<unsigned>(chunks)), kTraceLanes, 0,
                                          stream>>>(a, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kFinishThreads = 128;
    trace_finish_kernel<acc_t><<<static_cast<unsigned>((a.batch + kFinishThreads - 1) / kFinishThreads), kFinishThreads, 0,
                                 stream>>>(a, sums, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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

// Block (n, c) of a Runge-Kutta stage: sample n's chunk c. Writes the outputs of the chunk's features
// and its two sums (probes, squared errors) to chunk_sums[2 (n * chunks + c) + {0, 1}].
template <class T, class acc_t>
__global__ void rk_stage_chunk_kernel(RkStageArgs a, acc_t* chunk_sums) {
  __shared__ acc_t partial[kTraceLanes];
  const int64_t n = blockIdx.x, c = blockIdx.y, chunks = gridDim.y;
  const int lane = threadIdx.x;
  const int64_t first = c * kTraceChunk, last = min(a.features, first + kTraceChunk);
  const acc_t probe_sum = block_probe_sum<T, acc_t>(a.probes, a.products, a.num_probes, n, first, last, partial);
  acc_t squares = acc_t(0);
  for (int64_t f = first + lane; f < last; f += kTraceLanes) squares = squares + rk_stage_element<T, acc_t>(a, n, f);
  partial[lane] = squares;
  block_tree_sum(partial, lane);
  if (lane == 0) {
    chunk_sums[2 * (n * chunks + c)] = probe_sum;
    chunk_sums[2 * (n * chunks + c) + 1] = partial[0];
  }
}

// Thread n: sample n's chunk sums in increasing order, then its trace, log-density and error norm.
template <class acc_t>
__global__ void rk_stage_finish_kernel(RkStageArgs a, const acc_t* chunk_sums, int64_t chunks) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.batch) return;
  acc_t probes = acc_t(0), squares = acc_t(0);
  for (int64_t c = 0; c < chunks; ++c) {
    probes = probes + chunk_sums[2 * (n * chunks + c)];
    squares = squares + chunk_sums[2 * (n * chunks + c) + 1];
  }
  rk_stage_finish(a, n, static_cast<double>(probes), static_cast<double>(squares));
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> rk_stage_cuda(DK_RK_STAGE_PARAMS) {
  RkStageCall call = prepare_rk_stage(DK_RK_STAGE_ARGS);
  const RkStageArgs& a = call.args;
  if (a.batch == 0) return {call.outputs, call.trace, call.log_density_next, call.norm};
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  const int64_t chunks = trace_chunks(a.features);
  TORCH_CHECK(a.batch <= 0x7fffffff && chunks <= 65535, "diffkern::rk_stage: batch or sample too large for one launch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype), "diffkern::rk_stage", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor chunk_sums = at::empty({2 * a.batch * chunks},
        inputs[0].options().dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
    acc_t* sums = static_cast<acc_t*>(chunk_sums.mutable_data_ptr());
    rk_stage_chunk_kernel<scalar_t, acc_t><<<dim3(static_cast<unsigned>(a.batch), static_cast<unsigned>(chunks)),
                                             kTraceLanes, 0, stream>>>(a, sums);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int kFinishThreads = 128;
    rk_stage_finish_kernel<acc_t><<<static_cast<unsigned>((a.batch + kFinishThreads - 1) / kFinishThreads),
                                    kFinishThreads, 0, stream>>>(a, sums, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {call.outputs, call.trace, call.log_density_next, call.norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("probe_trace", &probe_trace_cuda);
  m.impl("likelihood_step", &likelihood_step_cuda);
  m.impl("rk_stage", &rk_stage_cuda);
}

}  // namespace cuda
}  // namespace diffkern
