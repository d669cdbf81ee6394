// Host-side checks and launch arguments of the fused training loss (diffkern/loss_math.h), shared by
// the CPU and CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <vector>

#include "diffkern/loss_math.h"
#include "ops_common.h"

namespace diffkern {

#define DK_TRAINING_LOSS_PARAMS                                                                        \
  const at::Tensor &x0, const at::Tensor &model_output, const std::optional<at::Tensor>&noise,         \
      const at::Tensor &coefficients, bool stream_noise, int64_t seed, int64_t step, int64_t sample_offset, \
      int64_t stream, const std::optional<at::Tensor>&seed_step
#define DK_TRAINING_LOSS_ARGS \
  x0, model_output, noise, coefficients, stream_noise, seed, step, sample_offset, stream, seed_step

struct TrainingLoss {
  LossArgs args;
  at::Tensor loss;
  std::vector<at::Tensor> grads, copies;
};

inline TrainingLoss prepare_training_loss(DK_TRAINING_LOSS_PARAMS) {
  const char* op = "diffkern::training_loss";
  const at::ScalarType dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x0 must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x0.dim() >= 1, op, ": x0 must be [batch, ...], got a 0-d tensor");
  const FillShape shape = fill_shape_for(x0.sizes(), sample_offset);
  TrainingLoss result{};
  LossArgs& a = result.args;
  a.dtype = static_cast<int>(dtype);
  a.batch = shape.rows;
  a.features = shape.row_size;
  const auto input = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == x0.sizes() && t.scalar_type() == dtype && t.device() == x0.device(), op, ": ", name,
                " must be a ", dtype, " tensor of x0's shape ", x0.sizes(), " on ", x0.device(), ", got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
    if (samples_contiguous(t)) return StepInput{t.const_data_ptr(), step_row_stride(t)};
    result.copies.push_back(t.contiguous());
    return StepInput{result.copies.back().const_data_ptr(), step_row_stride(result.copies.back())};
  };
  a.x0 = input(x0, "x0");
  a.m = input(model_output, "model_output");
  a.noise = StepInput{nullptr, 0};
  TORCH_CHECK(!(noise.has_value() && stream_noise), op, ": give a noise tensor or stream_noise, not both");
  a.noise_source = NoiseSource::kNone;
  if (noise.has_value()) {
    a.noise = input(*noise, "noise");
    a.noise_source = NoiseSource::kTensor;
  } else if (stream_noise) {
    a.noise_source = NoiseSource::kStream;
  }
  TORCH_CHECK(coefficients.scalar_type() == at::kDouble && coefficients.dim() == 2 &&
                  coefficients.size(1) == kLossRowSize && coefficients.device() == x0.device() &&
                  (coefficients.size(0) == 1 || coefficients.size(0) == a.batch),
              op, ": coefficients must be float64 [1 or batch, ", kLossRowSize, "] on ", x0.device(), ", got ",
              coefficients.scalar_type(), " ", coefficients.sizes(), " on ", coefficients.device());
  if (!coefficients.is_contiguous()) result.copies.push_back(coefficients.contiguous());
  const at::Tensor& table = coefficients.is_contiguous() ? coefficients : result.copies.back();
  a.table = table.const_data_ptr<double>();
  a.table_rows = table.size(0);
  set_noise_key(a, noise_params_for(seed, step, sample_offset, stream, seed_step, x0.device()));
  return result;
}

inline TrainingLoss prepare_training_loss_forward(DK_TRAINING_LOSS_PARAMS) {
  TrainingLoss s = prepare_training_loss(DK_TRAINING_LOSS_ARGS);
  s.loss = at::empty({s.args.batch}, x0.options().dtype(at::kDouble));
  s.args.loss_out = s.loss.mutable_data_ptr<double>();
  return s;
}

// The backward: the gradients of (model_output, x0, noise) that output_mask asks for, from those of
// the per-sample losses; an unwanted gradient, or that of an absent noise tensor, is an empty tensor.
inline TrainingLoss prepare_training_loss_backward(const at::Tensor& grad_loss, DK_TRAINING_LOSS_PARAMS,
                                                   std::array<bool, 3> output_mask) {
  TrainingLoss s = prepare_training_loss(DK_TRAINING_LOSS_ARGS);
  const char* op = "diffkern::training_loss_backward";
  TORCH_CHECK(grad_loss.scalar_type() == at::kDouble && grad_loss.dim() == 1 && grad_loss.size(0) == s.args.batch &&
                  grad_loss.device() == x0.device(),
              op, ": grad_loss must be float64 [batch] on ", x0.device(), ", got ", grad_loss.scalar_type(), " ",
              grad_loss.sizes());
  s.copies.push_back(grad_loss.contiguous());
  s.args.grad_loss = s.copies.back().const_data_ptr<double>();
  void** outputs[3] = {&s.args.grad_m, &s.args.grad_x0, &s.args.grad_noise};
  for (int i = 0; i < 3; ++i) {
    const bool wanted = output_mask[i] && (i < 2 || noise.has_value());
    at::Tensor grad = at::empty(wanted ? x0.sizes() : at::IntArrayRef{0}, x0.options().memory_format(
                                                                               at::MemoryFormat::Contiguous));
    *outputs[i] = wanted ? grad.mutable_data_ptr() : nullptr;
    s.grads.push_back(grad);
  }
  return s;
}

}  // namespace diffkern
