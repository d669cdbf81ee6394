// The backward of the fused step (step_math.h). The step is linear in x, the model outputs, the
// guidance gradient and the noise; clipping makes x0 piecewise linear. So, with G the gradient of
// out and G0 that of the x0 output (aux = x0; else 0), and the forward's coefficients:
//
//     M       = [clip_lo <= a x + b m + e g <= clip_hi] (c G + G0)     (no clip: the bracket is 1)
//     grad m  = f G + b M     (guided: grad m_cond = w grad m, grad m_uncond = (1 - w) grad m)
//     grad x  = d G + a M
//     grad g  = h G + e M
//     grad z  = sigma_n G (+ the gradient of the noise output, aux = noise)
//     grad v  = var_beta sigma_n z G                                    (learned variance)
//
// a fused step of the same rows, with the clip mask recomputed from the inputs rather than stored.
// The noise z (needed only for grad v) is the tensor given or the same stream the forward drew.
#pragma once

#include "diffkern/macros.h"
#include "diffkern/step_args.h"
#include "diffkern/step_body.h"
#include "diffkern/step_math.h"

DK_NAMESPACE_BEGIN

template <class acc_t>
struct StepGrads {
  acc_t x, m, m_uncond, g, v, z;
};

template <class acc_t>
DK_INLINE StepGrads<acc_t> step_element_backward(const StepRow<acc_t>& r, const StepFlags& flags, AuxOutput aux,
                                                 acc_t x, acc_t m, acc_t m_uncond, acc_t g, acc_t v, acc_t z,
                                                 acc_t grad_out, acc_t grad_aux) {
  const acc_t m_eff = flags.guided ? fused_multiply_add(r.w, m - m_uncond, m_uncond) : m;
  const acc_t x0 = add_term(r.a, x, add_term(r.b, m_eff, term(r.e, g)));  // as the forward: the same clip mask
  const bool inside = !flags.clip || (x0 >= r.clip_lo && x0 <= r.clip_hi);
  const acc_t through_x0 = r.c * grad_out + (aux == AuxOutput::kX0 ? grad_aux : acc_t(0));
  const acc_t masked = inside ? through_x0 : acc_t(0);
  StepGrads<acc_t> grads;
  const acc_t grad_m = fused_multiply_add(r.f, grad_out, r.b * masked);
  grads.m = flags.guided ? r.w * grad_m : grad_m;
  grads.m_uncond = flags.guided ? (acc_t(1) - r.w) * grad_m : acc_t(0);
  grads.x = fused_multiply_add(r.d, grad_out, r.a * masked);
  grads.g = fused_multiply_add(r.h, grad_out, r.e * masked);
  acc_t sigma = r.sigma;
  grads.v = acc_t(0);
  if (flags.learned_variance) {
    const acc_t exponent = fused_multiply_add(r.var_beta, v, r.var_alpha);
    sigma = r.sigma != acc_t(0) ? exp_fixed(exponent) : acc_t(0);
    // exp_fixed saturates outside [-80, 80]: no slope there
    const bool sloped = exponent >= acc_t(-80) && exponent <= acc_t(80);
    grads.v = sloped ? r.var_beta * sigma * z * grad_out : acc_t(0);
  }
  grads.z = sigma * grad_out + (aux == AuxOutput::kNoise ? grad_aux : acc_t(0));
  return grads;
}

// Per-thread body, indexed as fused_step_block (one Philox block of one sample).
template <class T, class acc_t>
DK_INLINE void fused_step_backward_block(int64_t thread, const FusedStepBackwardArgs& b, const StepRow<acc_t>& row) {
  const FusedStepArgs& a = b.step;
  const int64_t blocks_per_row = (a.features + 3) / 4;
  int64_t sample, block;
  split_thread_index(thread, blocks_per_row, sample, block);
  const int64_t first = 4 * block;
  const int64_t count = a.features - first < 4 ? a.features - first : 4;

  acc_t x[4], m[4], m_uncond[4], g[4], v[4], z[4], grad_out[4], grad_aux[4];
  load_block<T>(a.x, sample, first, count, x);
  load_block<T>(a.m, sample, first, count, m);
  load_block<T>(a.m_uncond, sample, first, count, m_uncond);
  load_block<T>(a.g, sample, first, count, g);
  load_block<T>(a.v, sample, first, count, v);
  load_block<T>(a.noise, sample, first, count, z);
  load_block<T>(b.grad_out, sample, first, count, grad_out);
  load_block<T>(b.grad_aux, sample, first, count, grad_aux);
  if (a.noise_source == NoiseSource::kStream && a.learned_variance && row.sigma != acc_t(0)) {
    const NoiseKey key = resolve_noise_key(step_noise_params(a));
    const Float4 normal = noise_normal4(key, static_cast<uint32_t>(block),
                                        static_cast<uint32_t>(sample + static_cast<int64_t>(a.sample_offset)));
    for (int k = 0; k < 4; ++k) z[k] = static_cast<acc_t>(normal.v[k]);
  }

  const StepFlags flags{a.guided, a.clip, a.learned_variance};
  Pack4<T> packs[kStepGrads];
  for (int k = 0; k < 4; ++k) {
    const StepGrads<acc_t> d = step_element_backward(row, flags, a.aux_kind, x[k], m[k], m_uncond[k], g[k], v[k],
                                                     z[k], grad_out[k], grad_aux[k]);
    packs[kGradX].v[k] = static_cast<T>(d.x);
    packs[kGradM].v[k] = static_cast<T>(d.m);
    packs[kGradMUncond].v[k] = static_cast<T>(d.m_uncond);
    packs[kGradG].v[k] = static_cast<T>(d.g);
    packs[kGradV].v[k] = static_cast<T>(d.v);
    packs[kGradNoise].v[k] = static_cast<T>(d.z);
  }
  const int64_t offset = sample * a.features + first;
  for (int i = 0; i < kStepGrads; ++i)
    if (b.grads[i] != nullptr) store_pack(static_cast<T*>(b.grads[i]) + offset, packs[i], count);
}

DK_NAMESPACE_END
