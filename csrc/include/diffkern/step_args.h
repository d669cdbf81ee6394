// The arguments of one fused-step launch as plain data, shared by the CPU (scalar and per-ISA SIMD
// units) and CUDA paths. Deliberately outside the versioned namespace (see macros.h): it holds no
// functions, so every instruction-set unit can take it across its entry point.
#pragma once

#include <cstdint>

namespace diffkern {

// A [batch, features] view: features contiguous, samples row_stride elements apart. data is null
// when the input is absent.
struct StepInput {
  const void* data;
  int64_t row_stride;
};

enum class NoiseSource : int { kNone = 0, kTensor = 1, kStream = 2 };
enum class AuxOutput : int { kNone = 0, kX0 = 1, kNoise = 2 };

struct FusedStepArgs {
  int dtype;  // c10::ScalarType of every tensor (the CPU entry points switch on it)
  int64_t batch, features;
  StepInput x, m, m_uncond, g, v, noise;
  void* out;  // [batch, features], contiguous
  void* aux;  // the same, or null
  AuxOutput aux_kind;
  // Coefficient rows [table_rows, kStepRowSize] in the compute type (float, or double for double
  // tensors). Sample n uses row rows[rows_size == 1 ? 0 : n] when rows is set, else row `row`,
  // or row n when row < 0.
  const void* table;
  int64_t table_rows;
  const int64_t* rows;
  int64_t rows_size;
  int64_t row;
  NoiseSource noise_source;
  // The noise stream (when noise_source is kStream); seed_step as in diffkern/noise.h.
  uint64_t seed, step, sample_offset;
  uint32_t stream;
  const int64_t* seed_step;
  bool guided, clip, learned_variance;
};

}  // namespace diffkern

namespace diffkern {

// The widened fused step (diffkern/linear_step.h): any number of inputs up to kLinearMaxInputs,
// one or two linear outputs, the clipped x0 and the noise.
constexpr int kLinearMaxInputs = 8;
constexpr int kLinearMaxOutputs = 2;

struct LinearStepArgs {
  int dtype;  // c10::ScalarType of every tensor
  int64_t batch, features;
  int num_inputs, num_outputs;
  StepInput inputs[kLinearMaxInputs];
  StepInput noise;                   // data null unless noise_source is kTensor
  void* out[kLinearMaxOutputs];      // [batch, features], contiguous
  void* x0_out;                      // the same, or null
  const void* table;                 // [table_rows, row_size] in the compute type
  int64_t table_rows, row_size, row;
  NoiseSource noise_source;
  uint64_t seed, step, sample_offset;
  uint32_t stream;
  const int64_t* seed_step;
  bool clip;
};

}  // namespace diffkern

namespace diffkern {

// The backward of one fused step: the forward's arguments (its out/aux pointers unused), the
// gradients of its outputs, and where the gradients of its inputs go.
enum StepGrad : int { kGradX = 0, kGradM, kGradMUncond, kGradG, kGradV, kGradNoise, kStepGrads };

struct FusedStepBackwardArgs {
  FusedStepArgs step;
  StepInput grad_out, grad_aux;  // grad_aux.data is null when the aux output has no gradient
  void* grads[kStepGrads];       // [batch, features] contiguous, or null when not wanted
};

}  // namespace diffkern

namespace diffkern {

// The fused training loss (diffkern/loss_math.h) and its backward.
struct LossArgs {
  int dtype;  // c10::ScalarType of x0, the model output and a given noise tensor
  int64_t batch, features;
  StepInput x0, m, noise;  // noise.data is null unless noise_source is kTensor
  // Coefficient rows [table_rows, kLossRowSize], float64: sample n uses row n, or row 0 when
  // table_rows is 1.
  const double* table;
  int64_t table_rows;
  NoiseSource noise_source;
  uint64_t seed, step, sample_offset;
  uint32_t stream;
  const int64_t* seed_step;
  double* loss_out;          // forward: [batch] per-sample losses
  const double* grad_loss;   // backward: [batch] the gradient of each per-sample loss
  void* grad_m;              // backward outputs, [batch, features] contiguous, or null when not wanted
  void* grad_x0;
  void* grad_noise;
};

}  // namespace diffkern
