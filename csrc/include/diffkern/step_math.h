// The fused step: one formula for every sampler step of the form
//
//     m   = m_uncond + w (m_cond - m_uncond)          (classifier-free guidance, when given)
//     x0  = clip(a x + b m + e g)                     (prediction of the clean sample)
//     out = c x0 + d x + f m + h g + sigma_n z        (the update)
//
// (terms with a zero coefficient are absent, not multiplied by 0: see add_term)
// with per-sample coefficients (a row, computed in float64 on the host: diffkern/coefficients.py
// derives them for DDPM, DDIM, q_sample, ...), the model output m, a classifier gradient g and
// noise z. sigma_n is the row's sigma, or, for learned variances, exp(var_alpha + var_beta v) with v
// the model's variance output. Written once here, compiled for the CPU (scalar and SIMD) and CUDA.
#pragma once

#include <math.h>

#include "diffkern/macros.h"

DK_NAMESPACE_BEGIN

// The fields of a coefficient row, in memory order (diffkern/coefficients.py reads this list
// through torch.ops.diffkern.step_row_fields, so the layout is defined only here).
#define DK_STEP_ROW_FIELDS(X) \
  X(a) X(b) X(e) X(c) X(d) X(f) X(h) X(sigma) X(clip_lo) X(clip_hi) X(w) X(var_alpha) X(var_beta)

#define DK_STEP_ROW_DECLARE(name) acc_t name;
#define DK_STEP_ROW_COUNT(name) +1
template <class acc_t>
struct StepRow {
  DK_STEP_ROW_FIELDS(DK_STEP_ROW_DECLARE)
};
constexpr int kStepRowSize = 0 DK_STEP_ROW_FIELDS(DK_STEP_ROW_COUNT);
#undef DK_STEP_ROW_DECLARE
#undef DK_STEP_ROW_COUNT

template <class acc_t>
DK_INLINE StepRow<acc_t> load_step_row(const acc_t* p) {
  StepRow<acc_t> row;
  int i = 0;
#define DK_STEP_ROW_LOAD(name) row.name = p[i++];
  DK_STEP_ROW_FIELDS(DK_STEP_ROW_LOAD)
#undef DK_STEP_ROW_LOAD
  return row;
}

// Which optional terms a step has. The CUDA kernel and the CPU scalar path pass these at run time;
// the CPU SIMD path passes a type with constexpr members so the compiler removes the branches.
struct StepFlags {
  bool guided;            // m_uncond given: classifier-free guidance
  bool clip;              // clamp x0 to [clip_lo, clip_hi]
  bool learned_variance;  // sigma from the model's variance output v
};

DK_INLINE float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
DK_INLINE double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }

// exp(x) for the learned-variance sigma, as a fixed float32 sequence (bitwise equal on CPU and
// CUDA, unlike each platform's expf): x = k ln 2 + r, e^r by its Taylor polynomial to r^7 on
// |r| <= ln2 / 2 (relative error < 1e-8 before rounding), times 2^k through the exponent bits.
// NaN in gives NaN out, without converting NaN to an integer (undefined behaviour): the
// polynomial runs on 0 instead and the result is selected at the end, which keeps the loop
// branch-free for the vectoriser.
DK_INLINE float exp_fixed(float x_in) {
  const bool is_nan = !(x_in == x_in);
  float x = is_nan ? 0.0f : x_in;
  x = x < -80.0f ? -80.0f : (x > 80.0f ? 80.0f : x);  // keeps 2^k normal
  const float k = rintf(x * 1.44269504088896341f);
  const float r = fmaf(k, -0.693145751953125f, fmaf(k, -1.428606765330187e-06f, x));
  float p = 1.0f / 5040.0f;
  p = fmaf(p, r, 1.0f / 720.0f);
  p = fmaf(p, r, 1.0f / 120.0f);
  p = fmaf(p, r, 1.0f / 24.0f);
  p = fmaf(p, r, 1.0f / 6.0f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  const float result = float_of(bits_of(p) + (static_cast<uint32_t>(static_cast<int32_t>(k)) << 23));
  return is_nan ? x_in : result;
}
DK_INLINE double exp_fixed(double x) { return exp(x); }

// rest + coefficient * value, or rest itself when the coefficient is 0: a row that does not use an
// input has no such term, so an inf or nan there (x at its limit, an unused model output) must not
// reach the result as 0 * inf = nan. For finite values the two agree (up to the sign of a zero).
template <class acc_t>
DK_INLINE acc_t add_term(acc_t coefficient, acc_t value, acc_t rest) {
  return coefficient != acc_t(0) ? fused_multiply_add(coefficient, value, rest) : rest;
}

template <class acc_t>
DK_INLINE acc_t term(acc_t coefficient, acc_t value) {
  return coefficient != acc_t(0) ? coefficient * value : acc_t(0);
}

// One element of the step. Absent inputs are passed as 0 (their coefficients are 0 too); a term
// whose coefficient is 0 is skipped (add_term).
template <class acc_t, class Flags>
DK_INLINE acc_t step_element(const StepRow<acc_t>& r, const Flags& flags, acc_t x, acc_t m, acc_t m_uncond,
                             acc_t g, acc_t v, acc_t z, acc_t& x0_out) {
  if (flags.guided) m = fused_multiply_add(r.w, m - m_uncond, m_uncond);
  acc_t x0 = add_term(r.a, x, add_term(r.b, m, term(r.e, g)));
  if (flags.clip) {
    x0 = x0 < r.clip_lo ? r.clip_lo : x0;
    x0 = x0 > r.clip_hi ? r.clip_hi : x0;
  }
  acc_t sigma = r.sigma;
  if (flags.learned_variance) sigma = r.sigma != acc_t(0) ? exp_fixed(fused_multiply_add(r.var_beta, v, r.var_alpha)) : acc_t(0);
  x0_out = x0;
  return add_term(r.c, x0, add_term(r.d, x, add_term(r.f, m, add_term(r.h, g, term(sigma, z)))));
}

DK_NAMESPACE_END
