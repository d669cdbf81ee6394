// Host-side argument checks of the trace and likelihood ops, shared by the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "diffkern/rk_stage.h"
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
  TORCH_CHECK(probes.dim() >= 2, "diffkern::probe_trace: probes and products must be [num_probes, batch, ...], got "
              "shape ", probes.sizes());
  LikelihoodArgs a{};
  a.dtype = static_cast<int>(dtype);
  a.num_probes = probes.size(0);
  a.batch = probes.size(1);
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

#define DK_RK_STAGE_PARAMS                                                                                     \
  at::TensorList inputs, const std::optional<at::Tensor>&probes, const std::optional<at::Tensor>&products,       \
      const at::Tensor &coefficients, at::TensorList traces, const std::optional<at::Tensor>&log_density,        \
      int64_t outputs, bool error, double trace_scale, double atol, double rtol
#define DK_RK_STAGE_ARGS inputs, probes, products, coefficients, traces, log_density, outputs, error, trace_scale, atol, rtol

struct RkStageCall {
  RkStageArgs args;
  std::vector<at::Tensor> outputs;
  at::Tensor trace, log_density_next, norm;
};

// Checks the arguments of diffkern::rk_stage (diffkern/rk_stage.h) and allocates its outputs.
inline RkStageCall prepare_rk_stage(DK_RK_STAGE_PARAMS) {
  const char* op = "diffkern::rk_stage";
  TORCH_CHECK(!inputs.empty() && static_cast<int64_t>(inputs.size()) <= kRkMaxInputs, op, ": takes 1 to ",
              kRkMaxInputs, " inputs, got ", inputs.size());
  TORCH_CHECK(outputs >= 0 && outputs <= kRkMaxOutputs, op, ": outputs must be 0, 1 or 2, got ", outputs);
  TORCH_CHECK(static_cast<int64_t>(traces.size()) <= kRkMaxTraces, op, ": takes at most ", kRkMaxTraces,
              " traces, got ", traces.size());
  const at::Tensor& x = inputs[0];
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": inputs must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x.dim() >= 1, op, ": inputs must be [batch, ...], got a 0-d tensor");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == dtype && t.device() == x.device() && t.is_contiguous(),
                op, ": inputs[", i, "] must be a contiguous ", dtype, " tensor of shape ", x.sizes(), " on ",
                x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
  RkStageArgs a{};
  a.dtype = static_cast<int>(dtype);
  a.batch = x.size(0);
  a.features = a.batch > 0 ? x.numel() / a.batch : 1;
  for (int64_t d = 1; d < x.dim(); ++d) TORCH_CHECK(x.size(d) > 0 || a.batch == 0, op, ": empty feature dims");
  a.num_inputs = static_cast<int>(inputs.size());
  a.num_outputs = static_cast<int>(outputs);
  a.num_traces = static_cast<int>(traces.size());
  a.error = error;
  for (size_t i = 0; i < inputs.size(); ++i) a.inputs[i] = inputs[i].const_data_ptr();
  TORCH_CHECK(probes.has_value() == products.has_value(), op, ": give both probes and products or neither");
  if (probes.has_value()) {
    TORCH_CHECK(probes->sizes() == products->sizes() && probes->dim() == x.dim() + 1 &&
                    probes->sizes().slice(1) == x.sizes(),
                op, ": probes and products must be [num_probes, ", x.sizes(), "], got ", probes->sizes(), " and ",
                products->sizes());
    TORCH_CHECK(probes->scalar_type() == dtype && products->scalar_type() == dtype && probes->device() == x.device() &&
                    products->device() == x.device(),
                op, ": probes and products must be ", dtype, " tensors on ", x.device());
    a.num_probes = probes->size(0);
    a.probes = probe_view(*probes, "probes");
    a.products = probe_view(*products, "products");
  }
  if (error) {
    TORCH_CHECK(a.num_inputs >= 3, op, ": the error norm reads inputs[0] (x_{n+1}) and inputs[2] (x_n): give 3 or "
                "more inputs");
    TORCH_CHECK(std::isfinite(atol) && atol > 0 && std::isfinite(rtol) && rtol >= 0, op,
                ": need atol > 0 and rtol >= 0, finite, got atol=", atol, " rtol=", rtol);
  }
  TORCH_CHECK(error || (traces.empty() && !log_density.has_value()), op,
              ": traces and log_density are read by the error stage only (error=True)");
  const auto check_vector = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1 && t.size(0) == a.batch && t.is_contiguous() &&
                    t.device() == x.device(),
                op, ": ", name, " must be a contiguous float64 tensor [", a.batch, "] on ", x.device(), ", got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
  };
  for (size_t j = 0; j < traces.size(); ++j) {
    check_vector(traces[j], "each of traces");
    a.traces[j] = traces[j].const_data_ptr<double>();
  }
  if (log_density.has_value()) {
    check_vector(*log_density, "log_density");
    a.log_density = log_density->const_data_ptr<double>();
  }
  a.width = rk_row_width(a.num_inputs, outputs, a.num_traces, error);
  TORCH_CHECK(coefficients.scalar_type() == at::kDouble && coefficients.dim() == 2 && coefficients.is_contiguous() &&
                  coefficients.size(1) == a.width &&
                  (coefficients.size(0) == 1 || (coefficients.size(0) == a.batch && a.batch > 0)),
              op, ": coefficients must be a contiguous float64 tensor [1 or batch, ", a.width, "] for ", a.num_inputs,
              " inputs, ", outputs, " outputs and ", a.num_traces, " traces", error ? " with the error row" : "",
              ", got ", coefficients.scalar_type(), " ", coefficients.sizes());
  TORCH_CHECK(coefficients.device() == x.device(), op, ": coefficients are on ", coefficients.device(),
              " but the inputs are on ", x.device());
  a.coefficients = coefficients.const_data_ptr<double>();
  a.coefficient_rows = coefficients.size(0);
  a.trace_scale = trace_scale;
  a.atol = atol;
  a.rtol = rtol;

  RkStageCall call{};
  for (int64_t j = 0; j < outputs; ++j) {
    call.outputs.push_back(at::empty(x.sizes(), x.options()));
    a.out[j] = call.outputs.back().mutable_data_ptr();
  }
  const at::TensorOptions vector = x.options().dtype(at::kDouble);
  call.trace = at::empty({a.batch}, vector);
  a.trace_out = call.trace.mutable_data_ptr<double>();
  const bool has_q = error && log_density.has_value();
  call.log_density_next = at::empty({has_q ? a.batch : 0}, vector);
  a.log_density_out = has_q ? call.log_density_next.mutable_data_ptr<double>() : nullptr;
  call.norm = at::empty({error ? a.batch : 0}, vector);
  a.norm_out = error ? call.norm.mutable_data_ptr<double>() : nullptr;
  call.args = a;
  return call;
}

}  // namespace diffkern
