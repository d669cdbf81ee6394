// One stage of an embedded Runge-Kutta pair on the likelihood ODE, fused: the stage combinations,
// the Hutchinson trace, the log-density update and the error norm in one pass over the state.
//
// Inputs u_0 .. u_{n-1} [B, features] (diffkern/likelihood.py passes the stage point x_i, the model
// output m_i there, the step's start x_n and the earlier stages' velocities k_j), probes v and
// Jacobian-vector products Jv [K, B, features] (optional), earlier stages' traces tr_j [B] and the
// log-density integral q [B]. With one coefficient row per sample (or one for all), laid out as
//
//     [c0, c1,  C_0 (n), .., C_{outputs-1} (n),  E (n), beta (m + 1), eps (m + 1)]   (E, beta, eps: error only)
//
// sample n gets
//     out_j  = sum_i C_ji u_i                            (the velocity k_i = a x_i + b m_i, the next stage point)
//     tr     = c0 + c1 * trace_scale * sum_k sum_f v Jv   (the trace of dF/dx: a d + b tr(dm/dx))
// and, with error,
//     e      = sum_i E_i u_i                             (the embedded pair's error of x)
//     r_x    = sqrt(mean_f (e / (atol + rtol max(|u_0|, |u_2|)))^2)   (u_0 = x_{n+1}, u_2 = x_n)
//     q_next = q + sum_j beta_j tr_j + beta_m tr,   q_err = sum_j eps_j tr_j + eps_m tr
//     r_q    = |q_err| / (features atol + rtol max(|q|, |q_next|))      (the log-density in nats per dimension)
//     norm   = max(r_x, r_q)                          (nan if either is)
// The feature sums (trace and squares) run in the order of diffkern/trace_math.h (chunks of
// kTraceChunk features, kTraceLanes lanes, a binary tree), so the CPU and CUDA agree bit for bit.
// Every sum over inputs runs in input order over the terms whose coefficient is not 0 (the first a
// product, each later one an add of a product: separate roundings, no fma, so the CPU's vector loops
// and CUDA, built with --fmad=false, agree bitwise). Written once here for both devices.
#pragma once

#include <cmath>

#include "diffkern/macros.h"
#include "diffkern/trace_math.h"

namespace diffkern {

constexpr int kRkMaxInputs = 10;
constexpr int kRkMaxOutputs = 2;
constexpr int kRkMaxTraces = 8;

struct RkStageArgs {
  int dtype;  // c10::ScalarType of the inputs, probes and products
  int64_t batch, features, num_probes;  // num_probes 0: no trace (tr = c0)
  ProbeView probes, products;
  int num_inputs, num_outputs, num_traces;
  bool error;
  const void* inputs[kRkMaxInputs];  // [B, features] contiguous
  void* out[kRkMaxOutputs];
  const double* coefficients;  // [coefficient_rows, width]: row min(n, coefficient_rows - 1) for sample n
  int64_t coefficient_rows, width;
  const double* traces[kRkMaxTraces];  // [B] each
  const double* log_density;           // [B] or null
  double* trace_out;                   // [B]
  double* log_density_out;             // [B] (error and log_density) or null
  double* norm_out;                    // [B] (error) or null
  double trace_scale, atol, rtol;
};

}  // namespace diffkern

DK_NAMESPACE_BEGIN

DK_INLINE int64_t rk_row_width(int64_t inputs, int64_t outputs, int64_t traces, bool error) {
  return 2 + outputs * inputs + (error ? inputs + 2 * (traces + 1) : 0);
}
DK_INLINE int64_t rk_output_field(int64_t inputs, int64_t j) { return 2 + j * inputs; }
DK_INLINE int64_t rk_error_field(int64_t inputs, int64_t outputs) { return 2 + outputs * inputs; }
DK_INLINE int64_t rk_beta_field(int64_t inputs, int64_t outputs) { return 2 + (outputs + 1) * inputs; }

DK_INLINE const double* rk_row(const RkStageArgs& a, int64_t n) {
  return a.coefficients + (n < a.coefficient_rows ? n : a.coefficient_rows - 1) * a.width;
}

template <class acc_t>
DK_INLINE void rk_term(acc_t& sum, bool& started, acc_t coefficient, acc_t value) {
  if (coefficient == acc_t(0)) return;
  sum = started ? sum + coefficient * value : coefficient * value;
  started = true;
}

// The squared scaled error of one feature from its error e, x_{n+1} and x_n.
template <class acc_t>
DK_INLINE acc_t rk_scaled_square(acc_t e, acc_t x_next, acc_t x, acc_t atol, acc_t rtol) {
  const acc_t a1 = x_next < acc_t(0) ? -x_next : x_next, a0 = x < acc_t(0) ? -x : x;
  const acc_t ratio = e / (atol + rtol * (a1 > a0 ? a1 : a0));
  return ratio * ratio;
}

// Feature f of sample n (a CUDA thread's work): writes the outputs and returns the squared scaled
// error (0 without error).
template <class T, class acc_t>
DK_INLINE acc_t rk_stage_element(const RkStageArgs& a, int64_t n, int64_t f) {
  const double* row = rk_row(a, n);
  const int64_t index = n * a.features + f;
  const int n_in = a.num_inputs;
  acc_t u[kRkMaxInputs];
  for (int i = 0; i < n_in; ++i) u[i] = static_cast<acc_t>(static_cast<const T*>(a.inputs[i])[index]);
  for (int j = 0; j < a.num_outputs; ++j) {
    const double* c = row + rk_output_field(n_in, j);
    acc_t y = acc_t(0);
    bool started = false;
    for (int i = 0; i < n_in; ++i) rk_term(y, started, static_cast<acc_t>(c[i]), u[i]);
    static_cast<T*>(a.out[j])[index] = static_cast<T>(y);
  }
  if (!a.error) return acc_t(0);
  const double* c = row + rk_error_field(n_in, a.num_outputs);
  acc_t e = acc_t(0);
  bool started = false;
  for (int i = 0; i < n_in; ++i) rk_term(e, started, static_cast<acc_t>(c[i]), u[i]);
  return rk_scaled_square(e, u[0], u[2], static_cast<acc_t>(a.atol), static_cast<acc_t>(a.rtol));
}

// Sample n's trace, log-density update and error norm from its two feature sums.
DK_INLINE void rk_stage_finish(const RkStageArgs& a, int64_t n, double probe_sum, double square_sum) {
  const double* row = rk_row(a, n);
  const double trace = a.num_probes > 0 ? row[0] + row[1] * (probe_sum * a.trace_scale) : row[0];
  a.trace_out[n] = trace;
  if (!a.error) return;
  double r = a.features > 0 ? sqrt(square_sum / static_cast<double>(a.features)) : 0.0;
  if (a.log_density != nullptr) {
    const double* beta = row + rk_beta_field(a.num_inputs, a.num_outputs);
    const double* eps = beta + a.num_traces + 1;
    const double q = a.log_density[n];
    double q_next = q, q_err = 0.0;
    for (int j = 0; j < a.num_traces; ++j) {
      q_next = q_next + beta[j] * a.traces[j][n];
      q_err = q_err + eps[j] * a.traces[j][n];
    }
    q_next = q_next + beta[a.num_traces] * trace;
    q_err = q_err + eps[a.num_traces] * trace;
    a.log_density_out[n] = q_next;
    const double big = fabs(q) > fabs(q_next) ? fabs(q) : fabs(q_next);
    const double r_q = fabs(q_err) / (static_cast<double>(a.features) * a.atol + a.rtol * big);
    r = (r_q > r || r_q != r_q) ? r_q : r;
  }
  a.norm_out[n] = r;
}

DK_NAMESPACE_END
