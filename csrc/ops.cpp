// The op schemas of diffkern, in one place. Per-device kernels are registered next to their
// implementations (cpu/*.cpp, cuda/*.cu); fake (meta) kernels are registered from Python in
// diffkern/ops.py with torch.library.register_fake.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/library.h>

#include <torch/version.h>

#include <string>

#include "cpu/isa_dispatch.h"
#include "diffkern/loss_math.h"
#include "diffkern/step_math.h"

namespace diffkern {
namespace {

// "torch=<version compiled against>;cuda=<0|1>;cpu_isa=<avx512|avx2|scalar>", read by
// diffkern/_extension.py. cpu_isa is the instruction set the CPU kernels use on this machine.
std::string build_info() {
  std::string info = "torch=" + std::to_string(TORCH_VERSION_MAJOR) + "." +
                     std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
#ifdef DK_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  info += std::string(";cpu_isa=") + cpu::isa_name(cpu::best_isa());
  return info;
}

// Factory ops (no tensor argument unless seed_step is given) reach this catch-all kernel; it
// forwards to the kernel of the requested device, as ATen's BackendSelect does for torch.empty.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

c10::DispatchKeySet backend_keys(at::ScalarType dtype, at::Device device) {
  return c10::DispatchKeySet(c10::computeDispatchKey(dtype, at::kStrided, device));
}

at::Tensor randn_select(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                        int64_t stream, const std::optional<at::Tensor>& seed_step, at::ScalarType dtype,
                        at::Device device) {
  static const auto op = typed_op<decltype(randn_select)>("diffkern::randn");
  return op.redispatch(backend_keys(dtype, device), size, seed, step, sample_offset, stream, seed_step,
                       dtype, device);
}

at::Tensor rademacher_select(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                             int64_t stream, const std::optional<at::Tensor>& seed_step, at::ScalarType dtype,
                             at::Device device) {
  static const auto op = typed_op<decltype(rademacher_select)>("diffkern::rademacher");
  return op.redispatch(backend_keys(dtype, device), size, seed, step, sample_offset, stream, seed_step, dtype,
                       device);
}

at::Tensor random_bits_select(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                              int64_t stream, const std::optional<at::Tensor>& seed_step,
                              at::Device device) {
  static const auto op = typed_op<decltype(random_bits_select)>("diffkern::random_bits");
  return op.redispatch(backend_keys(at::kInt, device), size, seed, step, sample_offset, stream, seed_step,
                       device);
}

// The coefficient row layout of the fused step, "a,b,e,...", read by diffkern/coefficients.py.
std::string step_row_fields() {
  std::string fields;
#define DK_STEP_ROW_NAME(name) fields += (fields.empty() ? "" : ",") + std::string(#name);
  DK_STEP_ROW_FIELDS(DK_STEP_ROW_NAME)
#undef DK_STEP_ROW_NAME
  return fields;
}

// The coefficient row layout of the training loss, "model_output,x0,noise,weight".
std::string loss_row_fields() {
  std::string fields;
#define DK_LOSS_ROW_NAME(name) fields += (fields.empty() ? "" : ",") + std::string(#name);
  DK_LOSS_ROW_FIELDS(DK_LOSS_ROW_NAME)
#undef DK_LOSS_ROW_NAME
  return fields;
}

}  // namespace

TORCH_LIBRARY(diffkern, m) {
  m.def("build_info() -> str", &build_info);

  // Philox4x32-10 of explicit counters [..., 4] and keys [..., 2] (low 32 bits of each int64);
  // returns the four output words as int64 in [0, 2^32). For known-answer tests and users who want
  // the raw generator.
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");

  // The noise stream (csrc/include/diffkern/noise.h) materialised: standard normals, or the raw
  // 32-bit words as int32. seed is a uint64 in two's complement; seed_step (int64 [2] on `device`)
  // overrides seed and step when given.
  m.def(
      "randn(SymInt[] size, int seed, int step, int sample_offset, int stream, Tensor? seed_step, "
      "ScalarType dtype, Device device) -> Tensor");
  // The same stream as Rademacher signs: the sign bit of each word, -1 or +1 (Hutchinson probes).
  m.def(
      "rademacher(SymInt[] size, int seed, int step, int sample_offset, int stream, Tensor? seed_step, "
      "ScalarType dtype, Device device) -> Tensor");
  m.def(
      "random_bits(SymInt[] size, int seed, int step, int sample_offset, int stream, Tensor? seed_step, "
      "Device device) -> Tensor");

  // The fused sampler step of diffkern/step_math.h:
  //   m = m_uncond + w (m_cond - m_uncond); x0 = clip(a x + b m + e g);
  //   out = c x0 + d x + f m + h g + sigma z
  // x and every optional input are [batch, ...] with contiguous samples, all of one dtype.
  // coefficients: rows [R, len(step_row_fields)], float32 (float64 for float64 inputs); sample n uses
  // row rows[n] (rows has 1 or batch elements), else row `row` (-1: row n). z is `noise` if given,
  // else the noise stream (seed, step, sample_offset + n, stream) if stream_noise, else 0.
  // Returns (out, aux): aux is x0 (aux=1), the noise used (aux=2), or empty (aux=0).
  m.def("step_row_fields() -> str", &step_row_fields);
  m.def(
      "fused_step(Tensor x, Tensor? model_output, Tensor? model_output_uncond, Tensor? guidance_grad, "
      "Tensor? predicted_variance, Tensor? noise, Tensor coefficients, Tensor? rows, int row, bool clip, "
      "int aux, bool stream_noise, int seed, int step, int sample_offset, int stream, Tensor? seed_step) "
      "-> (Tensor, Tensor)");
  // The same writing into given buffers (contiguous, x's shape, not overlapping any input), so
  // sampling loops run without allocating.
  m.def(
      "fused_step.out(Tensor x, Tensor? model_output, Tensor? model_output_uncond, Tensor? guidance_grad, "
      "Tensor? predicted_variance, Tensor? noise, Tensor coefficients, Tensor? rows, int row, bool clip, "
      "int aux, bool stream_noise, int seed, int step, int sample_offset, int stream, Tensor? seed_step, *, "
      "Tensor(a!) out, Tensor(b!)? aux_out) -> ()");
  // The backward of fused_step (diffkern/step_backward.h): the gradients of its tensor inputs
  // (x, model_output, model_output_uncond, guidance_grad, predicted_variance, noise) from those of its
  // outputs, one launch. Gradients not in output_mask, or of absent inputs, are empty tensors.
  m.def(
      "fused_step_backward(Tensor grad_out, Tensor? grad_aux, Tensor x, Tensor? model_output, "
      "Tensor? model_output_uncond, Tensor? guidance_grad, Tensor? predicted_variance, Tensor? noise, "
      "Tensor coefficients, Tensor? rows, int row, bool clip, int aux, bool stream_noise, int seed, int step, "
      "int sample_offset, int stream, Tensor? seed_step, bool[6] output_mask) -> Tensor[]");
  m.def(
      "_fused_step_cpu_isa(Tensor x, Tensor? model_output, Tensor? model_output_uncond, Tensor? guidance_grad, "
      "Tensor? predicted_variance, Tensor? noise, Tensor coefficients, Tensor? rows, int row, bool clip, "
      "int aux, bool stream_noise, int seed, int step, int sample_offset, int stream, Tensor? seed_step, "
      "str isa) -> (Tensor, Tensor)");

  // The widened fused step of diffkern/linear_step.h, for solvers with history (multistep DPM-Solver++,
  // UniPC, Heun's stages): x0 = clip(a_z z + sum_i a_i inputs[i]); out_j = c_j x0 + sum_i d_ji inputs[i]
  // + s_j z, with row `row` of coefficients [R, n + 3 + outputs (n + 2)] (float32; float64 for float64
  // inputs). inputs (1 to 8, inputs[0] is the sample) share shape, dtype and device; z is `noise` if
  // given, else the stream (seed, step, sample_offset + n, stream) if stream_noise, else 0.
  // Returns [out_0, (out_1), (x0 when x0)].
  m.def(
      "linear_step(Tensor[] inputs, Tensor? noise, Tensor coefficients, int row, int outputs, bool x0, bool clip, "
      "bool stream_noise, int seed, int step, int sample_offset, int stream, Tensor? seed_step) -> Tensor[]");
  m.def(
      "linear_step.out(Tensor[] inputs, Tensor? noise, Tensor coefficients, int row, int outputs, bool x0, "
      "bool clip, bool stream_noise, int seed, int step, int sample_offset, int stream, Tensor? seed_step, *, "
      "Tensor(a!)[] out) -> ()");
  m.def(
      "_linear_step_cpu_isa(Tensor[] inputs, Tensor? noise, Tensor coefficients, int row, int outputs, bool x0, "
      "bool clip, bool stream_noise, int seed, int step, int sample_offset, int stream, Tensor? seed_step, "
      "str isa) -> Tensor[]");

  // Hutchinson's estimator (diffkern/trace_math.h): probes and Jacobian-vector products [K, B, ...]
  // (features contiguous, leading dims may be strided) -> float64 [B],
  // scale * sum_k sum_j probes * products, summed in one fixed order (bitwise equal on CPU and CUDA).
  m.def("probe_trace(Tensor probes, Tensor products, float scale) -> Tensor");
  // The same fused with a likelihood-ODE step: x_next = (c_x x + c_model m) + c_prev m_prev,
  // trace as probe_trace, delta_next = delta + l0 + l_prev trace_prev + l_trace trace.
  // Returns (x_next, delta_next, trace).
  m.def(
      "likelihood_step(Tensor x, Tensor model_output, Tensor? model_output_prev, Tensor probes, Tensor products, "
      "Tensor delta_logp, Tensor? trace_prev, float c_x, float c_model, float c_prev, float l0, float l_prev, "
      "float l_trace, float trace_scale) -> (Tensor, Tensor, Tensor)");

  // One stage of an embedded Runge-Kutta pair on the likelihood ODE (diffkern/rk_stage.h): outputs
  // sum_i C_ji inputs[i]; the trace c0 + c1 trace_scale sum v Jv (probes and products optional); with
  // error, the log-density update from the earlier stages' traces and the error norm per sample.
  // coefficients: float64 [1 or batch, width]. Returns (outputs, trace, log_density_next, norm);
  // the last two are empty without error (log_density_next also without log_density).
  m.def(
      "rk_stage(Tensor[] inputs, Tensor? probes, Tensor? products, Tensor coefficients, Tensor[] traces, "
      "Tensor? log_density, int outputs, bool error, float trace_scale, float atol, float rtol) "
      "-> (Tensor[], Tensor, Tensor, Tensor)");

  // The fused training loss of diffkern/loss_math.h: per-sample losses (float64 [batch])
  //   loss_n = weight_n * sum_j (p_m model_output + p_x0 x0 + p_z z)^2
  // with rows [1 or batch, len(loss_row_fields)] of float64 coefficients; z is `noise` if given, else
  // the stream (seed, step, sample_offset + n, stream) if stream_noise (drawn again, not stored), else 0.
  // x0, model_output and noise share shape and dtype. Summed in one fixed order on every device.
  m.def("loss_row_fields() -> str", &loss_row_fields);
  // The empirical Poisson field of PFGM (diffkern/poisson_field.h) at points [batch, N] (N <= 64) a
  // height dz [batch] > 0 above M charges [M, N] on the plane: the charges' mean weighted by
  // |y~ - x~_j|^-(N+1) ([batch, N], the points' dtype) and the log of the weights' sum (float64 [batch]).
  m.def("poisson_field(Tensor points, Tensor dz, Tensor charges) -> (Tensor, Tensor)");
  m.def("_poisson_field_cpu_isa(Tensor points, Tensor dz, Tensor charges, str isa) -> (Tensor, Tensor)");
  m.def(
      "training_loss(Tensor x0, Tensor model_output, Tensor? noise, Tensor coefficients, bool stream_noise, "
      "int seed, int step, int sample_offset, int stream, Tensor? seed_step) -> Tensor");
  // Its backward: the gradients of (model_output, x0, noise) from grad_loss [batch] (float64), the noise
  // drawn once more; gradients not in output_mask (or of an absent noise) are empty tensors.
  m.def(
      "training_loss_backward(Tensor grad_loss, Tensor x0, Tensor model_output, Tensor? noise, "
      "Tensor coefficients, bool stream_noise, int seed, int step, int sample_offset, int stream, "
      "Tensor? seed_step, bool[3] output_mask) -> Tensor[]");
  m.def(
      "_training_loss_cpu_isa(Tensor x0, Tensor model_output, Tensor? noise, Tensor coefficients, "
      "bool stream_noise, int seed, int step, int sample_offset, int stream, Tensor? seed_step, str isa) -> Tensor");
  m.def(
      "_training_loss_backward_cpu_isa(Tensor grad_loss, Tensor x0, Tensor model_output, Tensor? noise, "
      "Tensor coefficients, bool stream_noise, int seed, int step, int sample_offset, int stream, "
      "Tensor? seed_step, bool[3] output_mask, str isa) -> Tensor[]");

  // Test hooks: CPU randn (or Rademacher signs) on a given instruction set ("auto", "scalar", "avx2",
  // "avx512").
  m.def(
      "_noise_cpu_isa(SymInt[] size, int seed, int step, int sample_offset, int stream, "
      "ScalarType dtype, str isa, bool rademacher) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkern, CompositeExplicitAutograd, m) {
  m.impl("randn", &randn_select);
  m.impl("random_bits", &random_bits_select);
  m.impl("rademacher", &rademacher_select);
}

}  // namespace diffkern
