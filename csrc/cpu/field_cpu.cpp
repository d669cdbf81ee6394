// CPU kernels of the Poisson field (diffkern/poisson_field.h): the SIMD units (simd/field_simd.h) when the
// CPU has them, otherwise the per-thread bodies lane by lane (what CUDA threads run); threads over points.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../field_common.h"
#include "isa_dispatch.h"

namespace diffkern {
namespace cpu {
namespace {

// Every lane of a point with the per-thread body, the tree, the outputs: CUDA's arithmetic, lane by lane.
template <class T>
void field_scalar(const FieldArgs& a, int64_t begin, int64_t end) {
  constexpr int L = kFieldLanes;
  T nearest[L], total[L], acc[kFieldMaxFeatures * L];
  for (int64_t n = begin; n < end; ++n) {
    const T* y = static_cast<const T*>(a.points) + n * a.features;
    const T dz = static_cast<const T*>(a.dz)[n];
    for (int l = 0; l < L; ++l) {
      nearest[l] = static_cast<T>(INFINITY);
      total[l] = T(0);
      for (int64_t k = 0; k < a.features; ++k) acc[k * L + l] = T(0);
      field_lane<T>(a, y, dz, l, 0, a.count, nearest[l], total[l], acc + l, L);
    }
    for (int s = L / 2; s > 0; s /= 2)
      for (int l = 0; l < s; ++l)
        field_merge(nearest[l], total[l], acc + l, nearest[l + s], total[l + s], acc + l + s, a.features, L, a.power,
                    a.half);
    field_finish(a, n, nearest[0], total[0], acc, L);
  }
}

std::tuple<at::Tensor, at::Tensor> poisson_field_on(Isa isa, const at::Tensor& points, const at::Tensor& dz,
                                                    const at::Tensor& charges) {
  TORCH_CHECK(points.device().is_cpu(), "diffkern::poisson_field: CPU kernel called for ", points.device());
  PoissonField s = prepare_poisson_field(points, dz, charges);
  const FieldArgs& a = s.args;
  if (a.batch == 0) return {s.mean, s.log_total};
  // a point costs count x features operations: enough points per task to amortise it
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, a.count * a.features));
  if (isa == Isa::kScalar) {
    AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "diffkern::poisson_field", [&] {
      at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) { field_scalar<scalar_t>(a, begin, end); });
    });
    return {s.mean, s.log_total};
  }
  const at::Tensor charges_t = charges.t().contiguous();  // [features, count]: a lane block is one load
  const void* transposed = charges_t.const_data_ptr();
  at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) {
      poisson_field_avx512(a, transposed, begin, end);
    } else {
      poisson_field_avx2(a, transposed, begin, end);
    }
  });
  return {s.mean, s.log_total};
}

std::tuple<at::Tensor, at::Tensor> poisson_field_cpu(const at::Tensor& points, const at::Tensor& dz,
                                                     const at::Tensor& charges) {
  return poisson_field_on(best_isa(), points, dz, charges);
}

// Test hook: a chosen instruction set ("scalar" is the CUDA thread bodies).
std::tuple<at::Tensor, at::Tensor> poisson_field_cpu_isa(const at::Tensor& points, const at::Tensor& dz,
                                                         const at::Tensor& charges, c10::string_view isa) {
  return poisson_field_on(isa_from_name(std::string(isa).c_str()), points, dz, charges);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("poisson_field", &poisson_field_cpu);
  m.impl("_poisson_field_cpu_isa", &poisson_field_cpu_isa);
}

}  // namespace cpu
}  // namespace diffkern
