// CUDA kernel of the Poisson field (diffkern/poisson_field.h): kFieldLanes threads per point, each one lane
// of the per-thread body over the charges from global memory (the lanes of all points in a block read
// the same charges, which the caches serve), then the lanes' tree through warp shuffles (a point's
// lanes are half a warp), then lane 0 writes. The CPU runs the same lanes and tree.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../field_common.h"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kPointsPerBlock = 8;
static_assert(kFieldLanes == 16, "a point's lanes are half a warp");

template <class T>
__global__ void field_kernel(FieldArgs a) {
  const int lane = threadIdx.x % kFieldLanes;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kPointsPerBlock + threadIdx.x / kFieldLanes;
  const bool active = n < a.batch;
  const int64_t point = active ? n : a.batch - 1;  // inactive threads shadow the last point for the shuffles
  const T* y = static_cast<const T*>(a.points) + point * a.features;
  const T dz = static_cast<const T*>(a.dz)[point];
  T nearest = static_cast<T>(INFINITY), total = T(0);
  T acc[kFieldMaxFeatures], other[kFieldMaxFeatures];
  for (int64_t k = 0; k < a.features; ++k) acc[k] = T(0);
  field_lane<T>(a, y, dz, lane, 0, a.count, nearest, total, acc, 1);
  for (int s = kFieldLanes / 2; s > 0; s /= 2) {
    const T nearest_b = __shfl_down_sync(0xffffffffu, nearest, s, kFieldLanes);
    const T total_b = __shfl_down_sync(0xffffffffu, total, s, kFieldLanes);
    for (int64_t k = 0; k < a.features; ++k) other[k] = __shfl_down_sync(0xffffffffu, acc[k], s, kFieldLanes);
    if (lane < s) field_merge(nearest, total, acc, nearest_b, total_b, other, a.features, 1, a.power, a.half);
  }
  if (active && lane == 0) field_finish(a, n, nearest, total, acc, 1);
}

std::tuple<at::Tensor, at::Tensor> poisson_field_cuda(const at::Tensor& points, const at::Tensor& dz,
                                                      const at::Tensor& charges) {
  TORCH_CHECK(points.device().is_cuda(), "diffkern::poisson_field: CUDA kernel called for ", points.device());
  PoissonField s = prepare_poisson_field(points, dz, charges);
  const FieldArgs& a = s.args;
  if (a.batch == 0) return {s.mean, s.log_total};
  const c10::cuda::CUDAGuard guard(points.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>((a.batch + kPointsPerBlock - 1) / kPointsPerBlock);
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "diffkern::poisson_field", [&] {
    field_kernel<scalar_t><<<blocks, kPointsPerBlock * kFieldLanes, 0, stream>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {s.mean, s.log_total};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) { m.impl("poisson_field", &poisson_field_cuda); }

}  // namespace cuda
}  // namespace diffkern
