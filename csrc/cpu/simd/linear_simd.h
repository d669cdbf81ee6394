// The widened fused step (diffkern/linear_step.h) on the CPU, item by item (cpu::StepItems): the
// inputs as runs of acc_t, the noise W blocks at a time (noise_simd.h), then one loop per term of
// each sum, which the compiler vectorises. Each element sees the same fused multiply-adds in the
// same order as in linear_x0 / linear_output, so the result is bitwise that of the per-thread body.
// Included only by the per-ISA TUs (isa_unit.inc), after their target pragma.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <type_traits>

#include "../isa_dispatch.h"
#include "diffkern/linear_step.h"
#include "diffkern/step_args.h"
#include "noise_simd.h"
#include "step_simd.h"

DK_NAMESPACE_BEGIN
namespace simd {

template <class acc_t>
void scale_into(acc_t* __restrict__ y, acc_t coefficient, const acc_t* __restrict__ z, int64_t count) {
  for (int64_t k = 0; k < count; ++k) y[k] = coefficient * z[k];
}

template <class acc_t>
void add_term(acc_t* __restrict__ y, acc_t coefficient, const acc_t* __restrict__ u, int64_t count) {
  for (int64_t k = 0; k < count; ++k) y[k] = fused_multiply_add(coefficient, u[k], y[k]);
}

// A sum of terms over a run, by linear_term's rule (linear_step.h): terms with coefficient 0 are
// skipped, the first is a product, the rest fused multiply-adds; no term gives +0.
template <class acc_t>
struct RunSum {
  acc_t* y;
  int64_t count;
  bool started = false;

  void term(acc_t coefficient, const acc_t* u) {
    if (coefficient == acc_t(0)) return;
    if (started) {
      add_term(y, coefficient, u, count);
    } else {
      scale_into(y, coefficient, u, count);
    }
    started = true;
  }
  void finish() {
    if (!started) std::fill(y, y + count, acc_t(0));
  }
};

template <class acc_t>
void clip_run(acc_t* __restrict__ y, acc_t lo, acc_t hi, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    acc_t v = y[k] < lo ? lo : y[k];
    y[k] = v > hi ? hi : v;
  }
}

template <class V, class T, class acc_t>
void linear_step_items(const LinearStepArgs& a, int64_t begin, int64_t end) {
  const cpu::StepItems items = cpu::StepItems::of(a.batch, a.features);
  const FillShape shape{a.batch, a.features, (a.features + 3) / 4};
  const NoiseKey key = resolve_noise_key(NoiseParams{a.seed, a.step, a.stream, a.sample_offset, a.seed_step});
  const int64_t n = a.num_inputs;
  const acc_t* row = static_cast<const acc_t*>(a.table) + a.row * a.row_size;
  const bool noisy = linear_row_noisy(row, n, a.num_outputs);
  const bool draw = a.noise_source == NoiseSource::kStream && noisy;
  const bool reads_x0 = linear_row_reads_x0(row, n, a.num_outputs);
  alignas(64) acc_t zeros[kStepChunk] = {};
  alignas(64) acc_t buffers[kLinearMaxInputs][kStepChunk];
  alignas(64) acc_t bz[kStepChunk], bx0[kStepChunk], bout[kStepChunk];
  alignas(64) float normals[kStepChunk];
  for (int64_t item = begin; item < end; ++item) {
    const auto [sample, samples, first, count] = items.run(item, a.batch, a.features);
    const int64_t elements = samples * count;
    const acc_t* u[kLinearMaxInputs];
    for (int64_t i = 0; i < n; ++i)
      u[i] = run_of<T>(a.inputs[i], a.features, sample, samples, first, count, buffers[i], zeros);
    const acc_t* z = run_of<T>(a.noise, a.features, sample, samples, first, count, bz, zeros);
    if (draw) {
      float* dst = std::is_same_v<acc_t, float> ? reinterpret_cast<float*>(bz) : normals;
      const int64_t first_block = sample * shape.blocks_per_row + first / 4;
      const int64_t last_block = (sample + samples - 1) * shape.blocks_per_row + (first + count + 3) / 4;
      fill<V, NormalDraw>(dst, sample * a.features + first, shape, key, a.sample_offset, first_block, last_block);
      if constexpr (!std::is_same_v<acc_t, float>) std::copy(normals, normals + elements, bz);
      z = bz;
    }

    const int64_t offset = sample * a.features + first;
    T* x0_t = a.x0_out == nullptr ? nullptr : static_cast<T*>(a.x0_out) + offset;
    acc_t* x0 = (std::is_same_v<T, acc_t> && x0_t != nullptr) ? reinterpret_cast<acc_t*>(x0_t) : bx0;
    if (x0_t != nullptr || reads_x0) {
      RunSum<acc_t> sum{x0, elements};
      sum.term(row[linear_noise_field(n)], z);
      for (int64_t i = 0; i < n; ++i) sum.term(row[i], u[i]);
      sum.finish();
      if (a.clip) clip_run(x0, row[linear_clip_field(n)], row[linear_clip_field(n) + 1], elements);
    }
    for (int j = 0; j < a.num_outputs; ++j) {
      const acc_t* r = row + linear_output_field(n, j);
      T* out_t = static_cast<T*>(a.out[j]) + offset;
      acc_t* y = std::is_same_v<T, acc_t> ? reinterpret_cast<acc_t*>(out_t) : bout;
      RunSum<acc_t> sum{y, elements};
      sum.term(r[n + 1], z);
      for (int64_t i = 0; i < n; ++i) sum.term(r[1 + i], u[i]);
      sum.term(r[0], x0);
      sum.finish();
      if constexpr (!std::is_same_v<T, acc_t>) store_converted<V>(out_t, bout, elements);
    }
    if (x0_t != nullptr && x0 == bx0) store_converted<V>(x0_t, bx0, elements);
  }
}

template <class V>
void linear_step_entry(const LinearStepArgs& a, int64_t begin, int64_t end) {
  dispatch_step_dtype(a.dtype, [&]<class T, class acc_t>() { linear_step_items<V, T, acc_t>(a, begin, end); });
}

}  // namespace simd
DK_NAMESPACE_END
