// Host-side checks and launch arguments of the Poisson field (diffkern/poisson_field.h), shared by the
// CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

#include "diffkern/poisson_field.h"

namespace diffkern {

struct PoissonField {
  FieldArgs args;
  at::Tensor mean, log_total;
  std::vector<at::Tensor> copies;
};

inline PoissonField prepare_poisson_field(const at::Tensor& points, const at::Tensor& dz, const at::Tensor& charges) {
  const char* op = "diffkern::poisson_field";
  const at::ScalarType dtype = points.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": points must be float32 or float64, got ", dtype);
  TORCH_CHECK(points.dim() == 2, op, ": points must be [batch, features], got ", points.sizes());
  TORCH_CHECK(charges.dim() == 2 && charges.size(1) == points.size(1), op, ": charges must be [count, ",
              points.size(1), "] like the points, got ", charges.sizes());
  TORCH_CHECK(charges.size(0) >= 1, op, ": charges must hold at least one charge");
  TORCH_CHECK(points.size(1) >= 1 && points.size(1) <= kFieldMaxFeatures, op, ": features must lie in [1, ",
              kFieldMaxFeatures, "], got ", points.size(1), " (larger: diffkern.models.EmpiricalPoissonField)");
  TORCH_CHECK(dz.dim() == 1 && dz.size(0) == points.size(0), op, ": dz must be [", points.size(0), "], got ",
              dz.sizes());
  for (const at::Tensor* t : {&dz, &charges})
    TORCH_CHECK(t->scalar_type() == dtype && t->device() == points.device(), op, ": dz and charges must be ", dtype,
                " on ", points.device(), " like the points, got ", t->scalar_type(), " on ", t->device());
  PoissonField result{};
  const auto contiguous = [&](const at::Tensor& t) -> const void* {
    if (t.is_contiguous()) return t.const_data_ptr();
    result.copies.push_back(t.contiguous());
    return result.copies.back().const_data_ptr();
  };
  FieldArgs& a = result.args;
  a.points = contiguous(points);
  a.dz = contiguous(dz);
  a.charges = contiguous(charges);
  a.batch = points.size(0);
  a.count = charges.size(0);
  a.features = points.size(1);
  a.dtype = static_cast<int>(dtype);
  a.power = static_cast<int>((a.features + 1) / 2);
  a.half = (a.features + 1) % 2 == 1;
  result.mean = at::empty({a.batch, a.features}, points.options());
  result.log_total = at::empty({a.batch}, points.options().dtype(at::kDouble));
  a.mean = result.mean.mutable_data_ptr();
  a.log_total = result.log_total.mutable_data_ptr<double>();
  return result;
}

}  // namespace diffkern
