// Host-side argument checks of the trace and likelihood ops, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>

#include "diffkern/trace_math.h"

namespace diffkern {

#define DK_LIKELIHOOD_STEP_PARAMS                                                                              \
  const at::Tensor &x, const at::Tensor &model_output, const std::optional<at::Tensor>&model_output_prev,     \
      const at::Tensor &probes, const at::Tensor &products, const at::Tensor &delta_logp,                      \
      const std::optional<at::Tensor>&trace_prev, double c_x, double c_model, double c_prev, double l0,       \
      double l_prev, double l_trace, double trace_scale
#define DK_LIKELIHOOD_STEP_ARGS                                                                              \
  x, model_output, model_output_prev, probes, products, delta_logp, trace_prev, c_x, c_model, c_prev, l0, l_prev, \
      l_trace, trace_scale

struct LikelihoodCall {
  LikelihoodArgs args;
  at::Tensor x_next, delta_next, trace;
};

// [K, B, ...] with each (k, n) row contiguous: its two leading strides.
inline ProbeView probe_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2, "diffkern: ", name, " must be [num_probes, batch, ...], got shape ", t.sizes());
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expected, "diffkern: ", name,
                " must have contiguous features for each probe and sample (got strides ", t.strides(), ")");
    expected *= t.size(d);
  }
  return ProbeView{t.const_data_ptr(), t.stride(0), t.stride(1)};
}

inline LikelihoodCall prepare_probe_trace(const at::Tensor& probes, const at::Tensor& products, double scale) {
  TORCH_CHECK(probes.sizes() == products.sizes(), "diffkern::probe_trace: probes ", probes.sizes(),
              " and products ", products.sizes(), " differ in shape");
  TORCH_CHECK(probes.scalar_type() == products.scalar_type() && probes.device() == products.device(),
              "diffkern::probe_trace: probes and products must share dtype and device");
  const at::ScalarType dtype = probes.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "diffkern::probe_trace: floating-point probes expected, got ", dtype);
  LikelihoodArgs a{};
  a.dtype = static_cast<int>(dtype);
  a.num_probes = probes.size(0);
  a.batch = probes.dim() >= 2 ? probes.size(1) : 0;
  a.features = probes.numel() / std::max<int64_t>(1, a.num_probes * a.batch);
  a.probes = probe_view(probes, "probes");
  a.products = probe_view(products, "products");
  a.trace_scale = scale;
  LikelihoodCall call{a, {}, {}, at::empty({a.batch}, probes.options().dtype(at::kDouble))};
  call.args.trace_out = call.trace.mutable_data_ptr<double>();
  return call;
}

inline LikelihoodCall prepare_likelihood_step(DK_LIKELIHOOD_STEP_PARAMS) {
  LikelihoodCall call = prepare_probe_trace(probes, products, trace_scale);
  LikelihoodArgs& a = call.args;
  TORCH_CHECK(x.device() == probes.device(), "diffkern::likelihood_step: x is on ", x.device(), " but probes are on ",
              probes.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(0) == a.batch && x.numel() == a.batch * a.features,
              "diffkern::likelihood_step: x ", x.sizes(), " does not match probes ", probes.sizes());
  for (const at::Tensor* t : {&x, &model_output}) {
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == probes.scalar_type() && t->device() == x.device() &&
                    t->is_contiguous(),
                "diffkern::likelihood_step: x and model_output must be contiguous ", probes.scalar_type(),
                " tensors of one shape on ", probes.device());
  }
  if (model_output_prev.has_value())
    TORCH_CHECK(model_output_prev->sizes() == x.sizes() && model_output_prev->scalar_type() == x.scalar_type() &&
                    model_output_prev->device() == x.device() && model_output_prev->is_contiguous(),
                "diffkern::likelihood_step: model_output_prev must match x");
  const auto check_vector = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1 && t.size(0) == a.batch && t.is_contiguous() &&
                    t.device() == x.device(),
                "diffkern::likelihood_step: ", name, " must be a contiguous float64 tensor [batch] on ", x.device());
  };
  check_vector(delta_logp, "delta_logp");
  if (trace_prev.has_value()) check_vector(*trace_prev, "trace_prev");
  a.x = x.const_data_ptr();
  a.m = model_output.const_data_ptr();
  a.m_prev = model_output_prev.has_value() ? model_output_prev->const_data_ptr() : nullptr;
  a.delta = delta_logp.const_data_ptr<double>();
  a.trace_prev = trace_prev.has_value() ? trace_prev->const_data_ptr<double>() : nullptr;
  a.c_x = c_x;
  a.c_model = c_model;
  a.c_prev = c_prev;
  a.l0 = l0;
  a.l_prev = l_prev;
  a.l_trace = l_trace;
  call.x_next = at::empty(x.sizes(), x.options());
  call.delta_next = at::empty({a.batch}, delta_logp.options());
  a.x_out = call.x_next.mutable_data_ptr();
  a.delta_out = call.delta_next.mutable_data_ptr<double>();
  return call;
}

}  // namespace diffkern
