// The widened fused step, for solvers that read more than x and the model output (multistep
// DPM-Solver++, UniPC's corrector, the two stages of Heun's method, LCM's boundary condition):
//
//     x0    = clip(a_z z + sum_i a_i u_i)                       (clip optional)
//     out_j = c_j x0 + sum_i d_ji u_i + s_j z                   (j = 0 or 0, 1)
//
// for inputs u_0 .. u_{n-1} (the sample, the model output, kept history), noise z, and one
// coefficient row per step, laid out as
//
//     [a_0 .. a_{n-1}, a_z, clip_lo, clip_hi,  c_0, d_00 .. d_0(n-1), s_0,  c_1, d_10 .. , s_1]
//
// (diffkern/coefficients.py builds them). Every sum runs in the order written (noise term first,
// then the inputs in order, then x0) over the terms whose coefficient is not 0: the first such term
// is a product, each later one a fused multiply-add, and a sum with no such term is +0. So a term
// with coefficient 0 costs nothing and contributes nothing, even where its input is inf or nan (as
// in the formulas, which do not have the term), and the CPU vector loops, the per-thread body and
// CUDA agree bitwise. Written once here, compiled for the CPU and CUDA.
#pragma once

#include "diffkern/macros.h"
#include "diffkern/noise.h"
#include "diffkern/noise_fill.h"
#include "diffkern/step_args.h"
#include "diffkern/step_body.h"
#include "diffkern/step_math.h"

DK_NAMESPACE_BEGIN

DK_INLINE int64_t linear_row_size(int64_t inputs, int64_t outputs) { return inputs + 3 + outputs * (inputs + 2); }

// Offsets of the fields of a row with n inputs.
DK_INLINE int64_t linear_noise_field(int64_t n) { return n; }
DK_INLINE int64_t linear_clip_field(int64_t n) { return n + 1; }
DK_INLINE int64_t linear_output_field(int64_t n, int64_t j) { return n + 3 + j * (n + 2); }

// Whether a row reads the noise at all (rows that do not draw none: their z is 0).
template <class acc_t>
DK_INLINE bool linear_row_noisy(const acc_t* row, int64_t n, int64_t outputs) {
  bool noisy = row[linear_noise_field(n)] != acc_t(0);
  for (int64_t j = 0; j < outputs; ++j) noisy = noisy || row[linear_output_field(n, j) + n + 1] != acc_t(0);
  return noisy;
}

// Whether x0 is read by an output (c_j != 0); otherwise only an x0 output asks for it.
template <class acc_t>
DK_INLINE bool linear_row_reads_x0(const acc_t* row, int64_t n, int64_t outputs) {
  bool reads = false;
  for (int64_t j = 0; j < outputs; ++j) reads = reads || row[linear_output_field(n, j)] != acc_t(0);
  return reads;
}

// One term of a sum: skipped when its coefficient is 0, a product when it is the first.
template <class acc_t>
DK_INLINE void linear_term(acc_t& sum, bool& started, acc_t coefficient, acc_t value) {
  if (coefficient == acc_t(0)) return;
  sum = started ? fused_multiply_add(coefficient, value, sum) : coefficient * value;
  started = true;
}

template <class acc_t>
DK_INLINE acc_t linear_x0(const acc_t* row, int64_t n, const acc_t* u, acc_t z, bool clip) {
  acc_t x0 = acc_t(0);
  bool started = false;
  linear_term(x0, started, row[linear_noise_field(n)], z);
  for (int64_t i = 0; i < n; ++i) linear_term(x0, started, row[i], u[i]);
  if (clip) {
    const acc_t lo = row[linear_clip_field(n)], hi = row[linear_clip_field(n) + 1];
    x0 = x0 < lo ? lo : x0;
    x0 = x0 > hi ? hi : x0;
  }
  return x0;
}

template <class acc_t>
DK_INLINE acc_t linear_output(const acc_t* row, int64_t n, int64_t j, const acc_t* u, acc_t z, acc_t x0) {
  const acc_t* r = row + linear_output_field(n, j);
  acc_t y = acc_t(0);
  bool started = false;
  linear_term(y, started, r[n + 1], z);
  for (int64_t i = 0; i < n; ++i) linear_term(y, started, r[1 + i], u[i]);
  linear_term(y, started, r[0], x0);
  return y;
}

// Per-thread body: one Philox block (up to 4 consecutive features of one sample), as
// fused_step_block. The CUDA kernel runs it per thread; the CPU scalar path for every index.
template <class T, class acc_t>
DK_INLINE void linear_step_block(int64_t thread, const LinearStepArgs& a) {
  const int64_t blocks_per_row = (a.features + 3) / 4;
  int64_t sample, block;
  split_thread_index(thread, blocks_per_row, sample, block);
  const int64_t first = 4 * block;
  const int64_t count = a.features - first < 4 ? a.features - first : 4;
  const acc_t* row = static_cast<const acc_t*>(a.table) + a.row * a.row_size;
  const int64_t n = a.num_inputs;

  acc_t u[4][kLinearMaxInputs], z[4];
  for (int64_t i = 0; i < n; ++i) {
    acc_t values[4];
    load_block<T>(a.inputs[i], sample, first, count, values);
    for (int k = 0; k < 4; ++k) u[k][i] = values[k];
  }
  load_block<T>(a.noise, sample, first, count, z);  // zeros unless noise_source is kTensor
  if (a.noise_source == NoiseSource::kStream && linear_row_noisy(row, n, a.num_outputs)) {
    const NoiseKey key = resolve_noise_key(NoiseParams{a.seed, a.step, a.stream, a.sample_offset, a.seed_step});
    const Float4 normal = noise_normal4(key, static_cast<uint32_t>(block),
                                        static_cast<uint32_t>(sample + static_cast<int64_t>(a.sample_offset)));
    for (int k = 0; k < 4; ++k) z[k] = static_cast<acc_t>(normal.v[k]);
  }

  Pack4<T> x0_pack, out_pack[kLinearMaxOutputs];
  for (int k = 0; k < 4; ++k) {
    const acc_t x0 = linear_x0(row, n, u[k], z[k], a.clip);
    x0_pack.v[k] = static_cast<T>(x0);
    for (int j = 0; j < a.num_outputs; ++j) out_pack[j].v[k] = static_cast<T>(linear_output(row, n, j, u[k], z[k], x0));
  }
  const int64_t offset = sample * a.features + first;
  for (int j = 0; j < a.num_outputs; ++j) store_pack(static_cast<T*>(a.out[j]) + offset, out_pack[j], count);
  if (a.x0_out != nullptr) store_pack(static_cast<T*>(a.x0_out) + offset, x0_pack, count);
}

DK_NAMESPACE_END
