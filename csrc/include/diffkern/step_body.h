// Per-thread body of the fused step: one Philox block (up to 4 consecutive features of one
// sample). The CUDA kernel calls it for its global thread index; the CPU scalar path calls it for
// every index, so the indexing, tail and noise logic that runs on the GPU runs in every CPU test.
#pragma once

#include "diffkern/macros.h"
#include "diffkern/noise.h"
#include "diffkern/noise_fill.h"
#include "diffkern/step_args.h"
#include "diffkern/step_math.h"

DK_NAMESPACE_BEGIN

// Up to four values of an input as acc_t (0 where absent or past the row's end); one vector load
// when aligned.
template <class T, class acc_t>
DK_INLINE void load_block(const StepInput& in, int64_t sample, int64_t first, int64_t count, acc_t (&out)[4]) {
  for (int k = 0; k < 4; ++k) out[k] = acc_t(0);
  if (in.data == nullptr) return;
  const T* p = static_cast<const T*>(in.data) + sample * in.row_stride + first;
  if (count == 4 && reinterpret_cast<uintptr_t>(p) % alignof(Pack4<T>) == 0) {
    const Pack4<T> pack = *reinterpret_cast<const Pack4<T>*>(p);
    for (int k = 0; k < 4; ++k) out[k] = static_cast<acc_t>(pack.v[k]);
    return;
  }
  for (int64_t k = 0; k < count; ++k) out[k] = static_cast<acc_t>(p[k]);
}

// The coefficient row of a sample (bounds are checked by the launchers for `row`; `rows` values
// are checked on the CPU, and on CUDA by a device assertion).
DK_INLINE int64_t step_row_index(const FusedStepArgs& a, int64_t sample) {
  if (a.rows != nullptr) return a.rows[a.rows_size == 1 ? 0 : sample];
  return a.row >= 0 ? a.row : sample;
}

template <class acc_t>
DK_INLINE StepRow<acc_t> step_row_for(const FusedStepArgs& a, int64_t index) {
  return load_step_row(static_cast<const acc_t*>(a.table) + index * kStepRowSize);
}

DK_INLINE NoiseParams step_noise_params(const FusedStepArgs& a) {
  return NoiseParams{a.seed, a.step, a.stream, a.sample_offset, a.seed_step};
}

template <class T, class acc_t>
DK_INLINE void fused_step_block(int64_t thread, const FusedStepArgs& a, const StepRow<acc_t>& row) {
  const int64_t blocks_per_row = (a.features + 3) / 4;
  int64_t sample, block;
  split_thread_index(thread, blocks_per_row, sample, block);
  const int64_t first = 4 * block;
  const int64_t count = a.features - first < 4 ? a.features - first : 4;

  acc_t x[4], m[4], m_uncond[4], g[4], v[4], z[4];
  load_block<T>(a.x, sample, first, count, x);
  load_block<T>(a.m, sample, first, count, m);
  load_block<T>(a.m_uncond, sample, first, count, m_uncond);
  load_block<T>(a.g, sample, first, count, g);
  load_block<T>(a.v, sample, first, count, v);
  load_block<T>(a.noise, sample, first, count, z);  // zeros unless noise_source is kTensor
  if (a.noise_source == NoiseSource::kStream && row.sigma != acc_t(0)) {
    const NoiseKey key = resolve_noise_key(step_noise_params(a));
    const Float4 normal = noise_normal4(key, static_cast<uint32_t>(block),
                                        static_cast<uint32_t>(sample + static_cast<int64_t>(a.sample_offset)));
    for (int k = 0; k < 4; ++k) z[k] = static_cast<acc_t>(normal.v[k]);
  }

  const StepFlags flags{a.guided, a.clip, a.learned_variance};
  Pack4<T> out, aux;
  for (int k = 0; k < 4; ++k) {
    acc_t x0;
    out.v[k] = static_cast<T>(step_element(row, flags, x[k], m[k], m_uncond[k], g[k], v[k], z[k], x0));
    aux.v[k] = static_cast<T>(a.aux_kind == AuxOutput::kNoise ? z[k] : x0);
  }
  const int64_t offset = sample * a.features + first;
  store_pack(static_cast<T*>(a.out) + offset, out, count);
  if (a.aux_kind != AuxOutput::kNone) store_pack(static_cast<T*>(a.aux) + offset, aux, count);
}

DK_NAMESPACE_END
