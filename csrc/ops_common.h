// Host-side argument checks and layouts shared by the CPU and CUDA launchers of the noise ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <vector>

#include "diffkern/noise.h"
#include "diffkern/noise_fill.h"
#include "diffkern/step_args.h"
#include "diffkern/step_backward.h"
#include "diffkern/step_math.h"
#include "diffkern/linear_step.h"

namespace diffkern {

constexpr int64_t kMaxSamples = int64_t{1} << 32;         // sample index is one 32-bit counter word
constexpr int64_t kMaxFeatures = int64_t{1} << 34;        // block index j / 4 is one 32-bit word
constexpr int64_t kMaxCounterWord = int64_t{1} << 32;

// Dim 0 is the batch (a 0-d shape is one sample); the remaining dims are one sample's features.
inline FillShape fill_shape_for(at::IntArrayRef size, int64_t sample_offset) {
  for (const int64_t s : size) TORCH_CHECK(s >= 0, "diffkern: negative size in ", size);
  const int64_t rows = size.empty() ? 1 : size[0];
  int64_t row_size = 1;
  for (size_t d = 1; d < size.size(); ++d) row_size *= size[d];
  TORCH_CHECK(row_size <= kMaxFeatures, "diffkern: at most 2^34 features per sample, got ", row_size);
  // written so that no sum can overflow: sample_offset may be anything an int64 holds
  TORCH_CHECK(sample_offset >= 0 && rows <= kMaxSamples && sample_offset <= kMaxSamples - rows,
              "diffkern: sample_offset + batch size must lie in [0, 2^32], got sample_offset=",
              sample_offset, " and batch size ", rows);
  return FillShape{rows, row_size, (row_size + 3) / 4};
}

inline NoiseParams noise_params_for(int64_t seed, int64_t step, int64_t sample_offset, int64_t stream,
                                    const std::optional<at::Tensor>& seed_step, at::Device device) {
  TORCH_CHECK(step >= 0 && step < kMaxCounterWord, "diffkern: step must lie in [0, 2^32), got ", step);
  TORCH_CHECK(stream >= 0 && stream < kMaxCounterWord, "diffkern: stream must lie in [0, 2^32), got ",
              stream);
  const int64_t* seed_step_ptr = nullptr;
  if (seed_step.has_value()) {
    const at::Tensor& t = *seed_step;
    TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 2 && t.is_contiguous(),
                "diffkern: seed_step must be a contiguous int64 tensor of 2 elements (seed, step), got ",
                t.scalar_type(), " with ", t.numel(), " elements");
    TORCH_CHECK(t.device() == device, "diffkern: seed_step is on ", t.device(),
                " but the kernel runs on ", device);
    seed_step_ptr = t.const_data_ptr<int64_t>();
    // On the CPU the values are at hand; CUDA kernels check the step with a device assertion
    // (reading it here would be a host sync, and graph replays update it after this check).
    if (t.device().is_cpu())
      TORCH_CHECK(seed_step_ptr[1] >= 0 && seed_step_ptr[1] < kMaxCounterWord,
                  "diffkern: the step in seed_step must lie in [0, 2^32), got ", seed_step_ptr[1]);
  }
  return NoiseParams{static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                     static_cast<uint32_t>(stream), static_cast<uint64_t>(sample_offset),
                     seed_step_ptr};
}

// Copies a checked noise key into an op's argument struct (every kernel argument struct names the
// key's fields alike).
template <class Args>
inline void set_noise_key(Args& a, const NoiseParams& params) {
  a.seed = params.seed;
  a.step = params.step;
  a.stream = params.stream;
  a.sample_offset = params.sample_offset;
  a.seed_step = params.seed_step;
}

// The output and parameters of a randn / random_bits call, checked.
struct NoiseFill {
  at::Tensor out;
  FillShape shape;
  NoiseParams params;
};

inline NoiseFill prepare_noise_fill(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                                    int64_t stream, const std::optional<at::Tensor>& seed_step,
                                    at::ScalarType dtype, at::Device device) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(size);
  const FillShape shape = fill_shape_for(sizes, sample_offset);
  const NoiseParams params = noise_params_for(seed, step, sample_offset, stream, seed_step, device);
  return NoiseFill{at::empty(sizes, at::TensorOptions().dtype(dtype).device(device)), shape, params};
}

inline void check_philox_inputs(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "diffkern: philox4x32_10 takes int64 counter and key tensors");
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4, "diffkern: counter must have shape [..., 4]");
  TORCH_CHECK(key.dim() >= 1 && key.size(-1) == 2 && key.numel() / 2 == counter.numel() / 4,
              "diffkern: key must have shape [..., 2] with as many rows as counter");
  TORCH_CHECK(key.device() == counter.device(), "diffkern: counter and key on different devices");
}

// ---- the fused step ----

// Whether every sample of t ([batch, ...]) is one contiguous run (dim 0 may have any stride).
inline bool samples_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// Sample n of t as a contiguous run of `features` elements: its row stride.
inline int64_t step_row_stride(const at::Tensor& t) {
  int64_t features = 1;
  for (int64_t d = 1; d < t.dim(); ++d) features *= t.size(d);
  return t.dim() == 0 ? 1 : (t.size(0) == 1 ? features : t.stride(0));
}

// The checked launch arguments of a fused step, its outputs, and the contiguous copies of inputs
// whose samples were not contiguous runs (e.g. channels_last), which the launch reads.
struct FusedStep {
  FusedStepArgs args;
  at::Tensor out, aux;
  std::vector<at::Tensor> copies;
};

// The parameters of the fused_step op (its schema is in ops.cpp), for the per-device kernels.
#define DK_FUSED_STEP_PARAMS                                                                                   \
  const at::Tensor &x, const std::optional<at::Tensor>&model_output,                                           \
      const std::optional<at::Tensor>&model_output_uncond, const std::optional<at::Tensor>&guidance_grad,      \
      const std::optional<at::Tensor>&predicted_variance, const std::optional<at::Tensor>&noise,               \
      const at::Tensor &coefficients, const std::optional<at::Tensor>&rows, int64_t row, bool clip, int64_t aux, \
      bool stream_noise, int64_t seed, int64_t step, int64_t sample_offset, int64_t stream,                    \
      const std::optional<at::Tensor>&seed_step
#define DK_FUSED_STEP_ARGS                                                                                  \
  x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise, coefficients, rows, row, clip, \
      aux, stream_noise, seed, step, sample_offset, stream, seed_step

// fused_step.out without torch's dispatcher: the CPU or (when built) CUDA kernel by x's device. The
// run engine's Python fast path calls it through diffkern._C (python_module.cpp) for its own buffers,
// when nothing records gradients: boxing the op's 19 arguments for the dispatcher cost more than a
// small step itself. The checks are the op's (prepare_fused_step).
void fused_step_out_direct(DK_FUSED_STEP_PARAMS, at::Tensor& out, const std::optional<at::Tensor>& aux_out);
namespace cpu {
void fused_step_out_kernel(DK_FUSED_STEP_PARAMS, at::Tensor& out, const std::optional<at::Tensor>& aux_out);
}
namespace cuda {
void fused_step_out_kernel(DK_FUSED_STEP_PARAMS, at::Tensor& out, const std::optional<at::Tensor>& aux_out);
}

// Whether a and b may share memory. ATen's answer when it has one; where it gives up ("too hard":
// a view that is not dense, such as a strided slice or an expanded tensor), whether the byte
// ranges the two views span in one storage intersect. That is conservative for interleaved views
// (x[::2] and x[1::2] count as overlapping) and never misses an overlap.
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0) return false;
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  if (status == at::MemOverlapStatus::No) return false;
  if (status != at::MemOverlapStatus::TooHard) return true;
  if (!a.has_storage() || !b.has_storage() || !a.storage().is_alias_of(b.storage())) return false;
  const auto span = [](const at::Tensor& t, int64_t& lo, int64_t& hi) {
    lo = hi = reinterpret_cast<int64_t>(t.const_data_ptr());
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t reach = (t.size(d) - 1) * t.stride(d) * static_cast<int64_t>(t.element_size());
      (reach < 0 ? lo : hi) += reach;
    }
    hi += static_cast<int64_t>(t.element_size());
  };
  int64_t a_lo, a_hi, b_lo, b_hi;
  span(a, a_lo, a_hi);
  span(b, b_lo, b_hi);
  return a_lo < b_hi && b_lo < a_hi;
}

inline void check_no_overlap(const char* op, const at::Tensor& out, const char* out_name, const at::Tensor& input,
                             const char* input_name) {
  TORCH_CHECK(!may_overlap(out, input), op, ": ", out_name, " overlaps ", input_name,
              " in memory (the kernel would read values it has already overwritten); write to a separate buffer");
}

// The out= overload writes into given buffers: contiguous, x's shape, dtype and device, and not
// overlapping any input, the coefficient table, the row indices or seed_step (the kernel reads
// them while it writes).
inline void check_step_output(const at::Tensor& out, const at::Tensor& x, const char* name,
                              std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>> inputs) {
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() && out.device() == x.device() &&
                  out.is_contiguous(),
              "diffkern::fused_step: ", name, " must be a contiguous ", x.scalar_type(), " tensor of shape ",
              x.sizes(), " on ", x.device());
  check_no_overlap("diffkern::fused_step", out, name, x, "x");
  for (const auto& [input_name, t] : inputs)
    if (t->has_value()) check_no_overlap("diffkern::fused_step", out, name, **t, input_name);
}

inline FusedStep prepare_fused_step(DK_FUSED_STEP_PARAMS, const at::Tensor* out = nullptr,
                                    const at::Tensor* aux_out = nullptr, bool allocate_outputs = true) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "diffkern::fused_step: x must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t batch = x.dim() == 0 ? 1 : x.size(0);
  const FillShape shape = fill_shape_for(x.sizes(), sample_offset);

  FusedStepArgs a{};
  a.dtype = static_cast<int>(dtype);
  a.batch = batch;
  a.features = shape.row_size;
  FusedStep result{};
  const auto input = [&](const at::Tensor& t) {
    if (samples_contiguous(t)) return StepInput{t.const_data_ptr(), step_row_stride(t)};
    result.copies.push_back(t.contiguous());
    return StepInput{result.copies.back().const_data_ptr(), step_row_stride(result.copies.back())};
  };
  a.x = input(x);
  const std::pair<const std::optional<at::Tensor>*, StepInput*> inputs[] = {
      {&model_output, &a.m}, {&model_output_uncond, &a.m_uncond}, {&guidance_grad, &a.g},
      {&predicted_variance, &a.v}, {&noise, &a.noise}};
  const char* names[] = {"model_output", "model_output_uncond", "guidance_grad", "predicted_variance", "noise"};
  for (int i = 0; i < 5; ++i) {
    const std::optional<at::Tensor>& t = *inputs[i].first;
    *inputs[i].second = StepInput{nullptr, 0};
    if (!t.has_value()) continue;
    TORCH_CHECK(t->sizes() == x.sizes(), "diffkern::fused_step: ", names[i], " has shape ", t->sizes(),
                " but x has ", x.sizes());
    TORCH_CHECK(t->scalar_type() == dtype, "diffkern::fused_step: ", names[i], " is ", t->scalar_type(),
                " but x is ", dtype);
    TORCH_CHECK(t->device() == x.device(), "diffkern::fused_step: ", names[i], " is on ", t->device(),
                " but x is on ", x.device());
    *inputs[i].second = input(*t);
  }
  TORCH_CHECK(!(model_output_uncond.has_value() && !model_output.has_value()),
              "diffkern::fused_step: model_output_uncond needs model_output");

  const at::ScalarType table_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coefficients.scalar_type() == table_dtype && coefficients.dim() == 2 &&
                  coefficients.size(1) == kStepRowSize,
              "diffkern::fused_step: coefficients must be a contiguous ", table_dtype, " tensor [rows, ",
              kStepRowSize, "] for ", dtype, " inputs, got ", coefficients.scalar_type(), " ",
              coefficients.sizes());
  TORCH_CHECK(coefficients.device() == x.device(), "diffkern::fused_step: coefficients are on ",
              coefficients.device(), " but x is on ", x.device());
  if (coefficients.is_contiguous()) {
    a.table = coefficients.const_data_ptr();
  } else {
    result.copies.push_back(coefficients.contiguous());
    a.table = result.copies.back().const_data_ptr();
  }
  a.table_rows = coefficients.size(0);
  a.rows = nullptr;
  a.rows_size = 0;
  a.row = row;
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() <= 1 && (rows->numel() == 1 || rows->numel() == batch),
                "diffkern::fused_step: rows must be an int64 tensor of 1 or batch (", batch, ") elements, got ",
                rows->scalar_type(), " ", rows->sizes());
    TORCH_CHECK(rows->device() == x.device(), "diffkern::fused_step: rows are on ", rows->device(),
                " but x is on ", x.device());
    if (rows->is_contiguous()) {
      a.rows = rows->const_data_ptr<int64_t>();
    } else {
      result.copies.push_back(rows->contiguous());
      a.rows = result.copies.back().const_data_ptr<int64_t>();
    }
    a.rows_size = rows->numel();
  } else if (row >= 0) {
    TORCH_CHECK(row < a.table_rows, "diffkern::fused_step: row ", row, " outside the table of ", a.table_rows,
                " rows");
  } else {
    TORCH_CHECK(row == -1, "diffkern::fused_step: row must be -1 (row n for sample n) or a row of the table, got ",
                row);
    TORCH_CHECK(a.table_rows == batch,
                "diffkern::fused_step: row -1 (one row per sample) needs a table of batch (", batch,
                ") rows, got ", a.table_rows);
  }
  a.clip = clip;
  a.guided = model_output_uncond.has_value();
  a.learned_variance = predicted_variance.has_value();
  TORCH_CHECK(aux >= 0 && aux <= 2, "diffkern::fused_step: aux must be 0 (none), 1 (x0) or 2 (noise)");
  a.aux_kind = static_cast<AuxOutput>(aux);

  a.noise_source = noise.has_value() ? NoiseSource::kTensor : (stream_noise ? NoiseSource::kStream : NoiseSource::kNone);
  set_noise_key(a, noise_params_for(seed, step, sample_offset, stream, seed_step, x.device()));

  result.args = a;
  if (out != nullptr) {
    const std::optional<at::Tensor> table_input(coefficients);
    const std::initializer_list<std::pair<const char*, const std::optional<at::Tensor>*>> reads = {
        {"model_output", &model_output}, {"model_output_uncond", &model_output_uncond},
        {"guidance_grad", &guidance_grad}, {"predicted_variance", &predicted_variance}, {"noise", &noise},
        {"coefficients", &table_input}, {"rows", &rows}, {"seed_step", &seed_step}};
    check_step_output(*out, x, "out", reads);
    result.out = *out;
    TORCH_CHECK(aux == 0 || aux_out != nullptr, "diffkern::fused_step.out: aux needs aux_out");
    if (aux != 0) {
      check_step_output(*aux_out, x, "aux_out", reads);
      check_no_overlap("diffkern::fused_step", *aux_out, "aux_out", *out, "out");
      result.aux = *aux_out;
    }
  } else if (allocate_outputs) {
    result.out = at::empty(x.sizes(), x.options());
    result.aux = aux != 0 ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  }
  result.args.out = result.out.defined() ? result.out.mutable_data_ptr() : nullptr;
  result.args.aux = aux != 0 && result.aux.defined() ? result.aux.mutable_data_ptr() : nullptr;
  return result;
}

// ---- the backward of the fused step (diffkern/step_backward.h) ----

struct FusedStepBackward {
  FusedStepBackwardArgs args;
  std::vector<at::Tensor> grads;  // x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise
  std::vector<at::Tensor> copies;
};

// The forward's arguments checked as the forward checks them; the gradients wanted are those of
// output_mask whose input is present (the others come back as empty tensors).
inline FusedStepBackward prepare_fused_step_backward(const at::Tensor& grad_out,
                                                     const std::optional<at::Tensor>& grad_aux,
                                                     DK_FUSED_STEP_PARAMS, std::array<bool, 6> output_mask) {
  FusedStep forward = prepare_fused_step(DK_FUSED_STEP_ARGS, nullptr, nullptr, /*allocate_outputs=*/false);
  FusedStepBackward result{};
  result.args.step = forward.args;
  result.copies = std::move(forward.copies);
  const auto gradient = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device(),
                "diffkern::fused_step_backward: ", name, " must be a ", x.scalar_type(), " tensor of shape ",
                x.sizes(), " on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
    result.copies.push_back(t.contiguous());
    return StepInput{result.copies.back().const_data_ptr(), step_row_stride(result.copies.back())};
  };
  result.args.grad_out = gradient(grad_out, "grad_out");
  result.args.grad_aux = grad_aux.has_value() && aux != 0 ? gradient(*grad_aux, "grad_aux") : StepInput{nullptr, 0};
  const bool present[kStepGrads] = {true, model_output.has_value(), model_output_uncond.has_value(),
                                    guidance_grad.has_value(), predicted_variance.has_value(), noise.has_value()};
  for (int i = 0; i < kStepGrads; ++i) {
    const bool wanted = output_mask[i] && present[i];
    result.grads.push_back(wanted ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options()));
    result.args.grads[i] = wanted ? result.grads.back().mutable_data_ptr() : nullptr;
  }
  return result;
}

// ---- the widened fused step ----

// The parameters of the linear_step op (schema in ops.cpp).
#define DK_LINEAR_STEP_PARAMS                                                                            \
  at::TensorList inputs, const std::optional<at::Tensor>&noise, const at::Tensor &coefficients, int64_t row, \
      int64_t outputs, bool x0, bool clip, bool stream_noise, int64_t seed, int64_t step, int64_t sample_offset, \
      int64_t stream, const std::optional<at::Tensor>&seed_step
#define DK_LINEAR_STEP_ARGS \
  inputs, noise, coefficients, row, outputs, x0, clip, stream_noise, seed, step, sample_offset, stream, seed_step

// linear_step.out without torch's dispatcher (see fused_step_out_direct).
void linear_step_out_direct(DK_LINEAR_STEP_PARAMS, at::TensorList out);
namespace cpu {
void linear_step_out_kernel(DK_LINEAR_STEP_PARAMS, at::TensorList out);
}
namespace cuda {
void linear_step_out_kernel(DK_LINEAR_STEP_PARAMS, at::TensorList out);
}

struct LinearStep {
  LinearStepArgs args;
  std::vector<at::Tensor> outputs;  // out_0 [, out_1] [, x0]
  std::vector<at::Tensor> copies;
};

// Checks the arguments; allocates the outputs unless `given` holds them (then checks those).
inline LinearStep prepare_linear_step(DK_LINEAR_STEP_PARAMS, const at::TensorList* given = nullptr) {
  TORCH_CHECK(!inputs.empty() && static_cast<int64_t>(inputs.size()) <= kLinearMaxInputs,
              "diffkern::linear_step: takes 1 to ", kLinearMaxInputs, " inputs, got ", inputs.size());
  TORCH_CHECK(outputs >= 1 && outputs <= kLinearMaxOutputs, "diffkern::linear_step: outputs must be 1 or 2, got ",
              outputs);
  const at::Tensor& x = inputs[0];
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "diffkern::linear_step: inputs must be float16, bfloat16, float32 or float64, got ", dtype);
  const FillShape shape = fill_shape_for(x.sizes(), sample_offset);
  LinearStepArgs a{};
  a.dtype = static_cast<int>(dtype);
  a.batch = shape.rows;
  a.features = shape.row_size;
  a.num_inputs = static_cast<int>(inputs.size());
  a.num_outputs = static_cast<int>(outputs);
  LinearStep result{};
  result.copies.reserve(inputs.size() + 2);
  const auto input = [&](const at::Tensor& t, const char* name, int64_t index) {
    TORCH_CHECK(t.sizes() == x.sizes(), "diffkern::linear_step: ", name, index, " has shape ", t.sizes(),
                " but inputs[0] has ", x.sizes());
    TORCH_CHECK(t.scalar_type() == dtype, "diffkern::linear_step: ", name, index, " is ", t.scalar_type(),
                " but inputs[0] is ", dtype);
    TORCH_CHECK(t.device() == x.device(), "diffkern::linear_step: ", name, index, " is on ", t.device(),
                " but inputs[0] is on ", x.device());
    if (samples_contiguous(t)) return StepInput{t.const_data_ptr(), step_row_stride(t)};
    result.copies.push_back(t.contiguous());
    return StepInput{result.copies.back().const_data_ptr(), step_row_stride(result.copies.back())};
  };
  for (size_t i = 0; i < inputs.size(); ++i) a.inputs[i] = input(inputs[i], "inputs", static_cast<int64_t>(i));
  a.noise = noise.has_value() ? input(*noise, "noise", -1) : StepInput{nullptr, 0};

  const at::ScalarType table_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t row_size = linear_row_size(a.num_inputs, outputs);
  TORCH_CHECK(coefficients.scalar_type() == table_dtype && coefficients.dim() == 2 && coefficients.size(1) == row_size,
              "diffkern::linear_step: coefficients must be a ", table_dtype, " tensor [rows, ", row_size, "] for ",
              inputs.size(), " ", dtype, " inputs and ", outputs, " outputs, got ", coefficients.scalar_type(), " ",
              coefficients.sizes());
  TORCH_CHECK(coefficients.device() == x.device(), "diffkern::linear_step: coefficients are on ",
              coefficients.device(), " but the inputs are on ", x.device());
  TORCH_CHECK(row >= 0 && row < coefficients.size(0), "diffkern::linear_step: row ", row,
              " outside the table of ", coefficients.size(0), " rows");
  if (coefficients.is_contiguous()) {
    a.table = coefficients.const_data_ptr();
  } else {
    result.copies.push_back(coefficients.contiguous());
    a.table = result.copies.back().const_data_ptr();
  }
  a.table_rows = coefficients.size(0);
  a.row_size = row_size;
  a.row = row;
  a.clip = clip;
  a.noise_source = noise.has_value() ? NoiseSource::kTensor : (stream_noise ? NoiseSource::kStream : NoiseSource::kNone);
  set_noise_key(a, noise_params_for(seed, step, sample_offset, stream, seed_step, x.device()));

  const size_t count = static_cast<size_t>(outputs) + (x0 ? 1 : 0);
  if (given != nullptr) {
    TORCH_CHECK(given->size() == count, "diffkern::linear_step.out: expected ", count, " output buffers, got ",
                given->size());
    for (size_t k = 0; k < count; ++k) {
      const at::Tensor& o = (*given)[k];
      TORCH_CHECK(o.sizes() == x.sizes() && o.scalar_type() == dtype && o.device() == x.device() && o.is_contiguous(),
                  "diffkern::linear_step.out: out[", k, "] must be a contiguous ", dtype, " tensor of shape ",
                  x.sizes(), " on ", x.device());
      const char* op = "diffkern::linear_step";
      for (const at::Tensor& t : inputs) check_no_overlap(op, o, "an output", t, "an input");
      if (noise.has_value()) check_no_overlap(op, o, "an output", *noise, "noise");
      check_no_overlap(op, o, "an output", coefficients, "coefficients");
      if (seed_step.has_value()) check_no_overlap(op, o, "an output", *seed_step, "seed_step");
      for (size_t l = 0; l < k; ++l) check_no_overlap(op, o, "an output", (*given)[l], "another output");
      result.outputs.push_back(o);
    }
  } else {
    for (size_t k = 0; k < count; ++k) result.outputs.push_back(at::empty(x.sizes(), x.options()));
  }
  a.x0_out = nullptr;
  for (int64_t j = 0; j < outputs; ++j) a.out[j] = result.outputs[j].mutable_data_ptr();
  if (x0) a.x0_out = result.outputs[outputs].mutable_data_ptr();
  result.args = a;
  return result;
}

}  // namespace diffkern
