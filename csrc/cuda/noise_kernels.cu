// CUDA kernels of the noise ops. Each __global__ computes its global thread index and calls the
// shared per-thread body (diffkern/noise_fill.h), which the CPU tests also run index by index.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops_common.h"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;

int64_t num_blocks_for(int64_t threads) {
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "diffkern: tensor too large for one launch");
  return blocks;
}

template <typename T, typename Generator>
__global__ void fill_kernel(T* out, FillShape shape, NoiseParams params, Generator generate) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (thread < shape.num_threads()) fill_block(thread, out, shape, params, generate);
}

template <typename T, typename Generator>
void launch_fill(T* out, const FillShape& shape, const NoiseParams& params, Generator generate) {
  const int64_t threads = shape.num_threads();
  if (threads == 0) return;
  fill_kernel<<<num_blocks_for(threads), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out, shape, params, generate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// randn and rademacher: floating-point values of the stream, drawn by Generator<scalar_t>.
template <template <typename> class Generator>
at::Tensor float_noise_cuda(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                            int64_t stream, const std::optional<at::Tensor>& seed_step, at::ScalarType dtype,
                            at::Device device) {
  TORCH_CHECK(device.is_cuda(), "diffkern: CUDA noise kernel called for device ", device);
  const c10::cuda::CUDAGuard guard(device);
  NoiseFill fill = prepare_noise_fill(size, seed, step, sample_offset, stream, seed_step, dtype, device);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diffkern::noise", [&] {
    launch_fill(fill.out.mutable_data_ptr<scalar_t>(), fill.shape, fill.params, Generator<scalar_t>{});
  });
  return fill.out;
}

at::Tensor random_bits_cuda(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                            int64_t stream, const std::optional<at::Tensor>& seed_step, at::Device device) {
  TORCH_CHECK(device.is_cuda(), "diffkern::random_bits: CUDA kernel called for device ", device);
  const c10::cuda::CUDAGuard guard(device);
  NoiseFill fill = prepare_noise_fill(size, seed, step, sample_offset, stream, seed_step, at::kInt, device);
  launch_fill(fill.out.mutable_data_ptr<int32_t>(), fill.shape, fill.params, BitsGenerator{});
  return fill.out;
}

__global__ void philox_kernel(const int64_t* counter, const int64_t* key, int64_t* out, int64_t rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < rows) philox_table_row(i, counter, key, out);
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_inputs(counter, key);
  const c10::cuda::CUDAGuard guard(counter.device());
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t rows = c.numel() / 4;
  if (rows > 0) {
    philox_kernel<<<num_blocks_for(rows), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        c.const_data_ptr<int64_t>(), k.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("randn", &float_noise_cuda<NormalGenerator>);
  m.impl("rademacher", &float_noise_cuda<RademacherGenerator>);
  m.impl("random_bits", &random_bits_cuda);
  m.impl("philox4x32_10", &philox4x32_10_cuda);
}

}  // namespace cuda
}  // namespace diffkern
