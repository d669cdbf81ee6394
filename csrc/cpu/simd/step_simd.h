// The fused step on the CPU, chunk by chunk: for each (sample, chunk of features) the noise is
// generated W blocks at a time (noise_simd.h), inputs of other dtypes are converted into float
// buffers, and step_element (diffkern/step_math.h) runs in a loop the compiler vectorises for the
// unit's instruction set. Same operations as the per-thread body, so bitwise equal to it and to CUDA.
// Included only by the per-ISA TUs (isa_unit.inc), after their target pragma.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <type_traits>

#include "../isa_dispatch.h"
#include "diffkern/step_args.h"
#include "diffkern/step_body.h"
#include "diffkern/step_math.h"
#include "noise_simd.h"

DK_NAMESPACE_BEGIN
namespace simd {

constexpr int64_t kStepChunk = cpu::kCpuStepChunk;  // a multiple of 4 W; the buffers stay in L1/L2

// Compile-time flags of a chunk loop: the three of StepFlags, and which optional streams exist.
// Absent streams are the constant 0 (no load), so the arithmetic, and the result, stays that of
// the per-thread body, which reads 0 for them.
template <bool kGuided, bool kClip, bool kLearned, bool kThird, bool kNoise, bool kStoreX0>
struct FixedStepFlags {
  static constexpr bool guided = kGuided, clip = kClip, learned_variance = kLearned;
  static constexpr bool third = kThird, noise = kNoise, store_x0 = kStoreX0;
};

// Normals of features [first, first + count) of one sample; first is a multiple of 4.
template <class V>
void normal_range(const NoiseKey& key, uint32_t sample, int64_t first, int64_t count, float* dst) {
  constexpr int W = V::kWidth;
  alignas(64) float tail[4 * W];
  const auto lanes = V::iota();
  for (int64_t done = 0; done < count; done += 4 * W) {
    const uint32_t block = static_cast<uint32_t>((first + done) / 4);
    const bool full = done + 4 * W <= count;
    normal_blocks<V>(key, V::add(V::splat(block), lanes), V::splat(sample), full ? dst + done : tail);
    if (!full) std::copy(tail, tail + (count - done), dst + done);
  }
}

// A chunk of an input as acc_t: the tensor itself when it already is acc_t, else converted into buf.
template <class T, class acc_t>
const acc_t* chunk_of(const StepInput& in, int64_t sample, int64_t first, int64_t count, acc_t* buf,
                      const acc_t* zeros) {
  if (in.data == nullptr) return zeros;
  const T* p = static_cast<const T*>(in.data) + sample * in.row_stride + first;
  if constexpr (std::is_same_v<T, acc_t>) {
    return p;
  } else {
    for (int64_t k = 0; k < count; ++k) buf[k] = static_cast<acc_t>(p[k]);
    return buf;
  }
}

// __restrict__ and the row by value let the compiler keep the coefficients in registers and drop the
// run-time alias checks that otherwise send it to its scalar fallback loop.
template <class Flags, class acc_t>
void step_chunk(const StepRow<acc_t> row, const acc_t* __restrict__ x, const acc_t* __restrict__ m,
                const acc_t* __restrict__ m_uncond, const acc_t* __restrict__ g, const acc_t* __restrict__ v,
                const acc_t* __restrict__ z, acc_t* __restrict__ out, acc_t* __restrict__ x0, int64_t count) {
  const Flags flags{};
  for (int64_t k = 0; k < count; ++k) {
    acc_t x0_k;
    out[k] = step_element(row, flags, x[k], m[k], Flags::guided ? m_uncond[k] : acc_t(0),
                          Flags::third ? g[k] : acc_t(0), Flags::learned_variance ? v[k] : acc_t(0),
                          Flags::noise ? z[k] : acc_t(0), x0_k);
    if (Flags::store_x0) x0[k] = x0_k;
  }
}

template <class acc_t>
using StepChunkFn = void (*)(const StepRow<acc_t>, const acc_t*, const acc_t*, const acc_t*, const acc_t*,
                             const acc_t*, const acc_t*, acc_t*, acc_t*, int64_t);

// The chunk loop for run-time flags: picks one of the 64 instantiations, one flag at a time.
template <class acc_t, bool... kFixed, class... Rest>
StepChunkFn<acc_t> step_chunk_for(bool flag, Rest... rest) {
  if constexpr (sizeof...(Rest) == 0) {
    return flag ? step_chunk<FixedStepFlags<kFixed..., true>, acc_t> : step_chunk<FixedStepFlags<kFixed..., false>, acc_t>;
  } else {
    return flag ? step_chunk_for<acc_t, kFixed..., true>(rest...) : step_chunk_for<acc_t, kFixed..., false>(rest...);
  }
}

// Work items [begin, end): item i is chunk i % chunks_per_sample of sample i / chunks_per_sample.
template <class V, class T, class acc_t>
void fused_step_items(const FusedStepArgs& a, int64_t begin, int64_t end) {
  const int64_t chunks_per_sample = (a.features + kStepChunk - 1) / kStepChunk;
  const NoiseKey key = resolve_noise_key(step_noise_params(a));
  const bool any_noise = a.noise_source != NoiseSource::kNone;
  const StepChunkFn<acc_t> chunk_fn = step_chunk_for<acc_t>(a.guided, a.clip, a.learned_variance, a.g.data != nullptr,
                                                            any_noise, a.aux_kind == AuxOutput::kX0);
  const StepChunkFn<acc_t> quiet_fn = step_chunk_for<acc_t>(a.guided, a.clip, a.learned_variance, a.g.data != nullptr,
                                                            false, a.aux_kind == AuxOutput::kX0);
  alignas(64) acc_t zeros[kStepChunk] = {};
  alignas(64) acc_t bx[kStepChunk], bm[kStepChunk], bmu[kStepChunk], bg[kStepChunk], bv[kStepChunk];
  alignas(64) acc_t bz[kStepChunk], bout[kStepChunk], baux[kStepChunk];
  alignas(64) float normals[kStepChunk];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t sample = item / chunks_per_sample;
    const int64_t first = (item % chunks_per_sample) * kStepChunk;
    const int64_t count = std::min(kStepChunk, a.features - first);
    const StepRow<acc_t> row = step_row_for<acc_t>(a, step_row_index(a, sample));

    const acc_t* x = chunk_of<T>(a.x, sample, first, count, bx, zeros);
    const acc_t* m = chunk_of<T>(a.m, sample, first, count, bm, zeros);
    const acc_t* m_uncond = chunk_of<T>(a.m_uncond, sample, first, count, bmu, zeros);
    const acc_t* g = chunk_of<T>(a.g, sample, first, count, bg, zeros);
    const acc_t* v = chunk_of<T>(a.v, sample, first, count, bv, zeros);
    const acc_t* z = chunk_of<T>(a.noise, sample, first, count, bz, zeros);
    if (a.noise_source == NoiseSource::kStream && row.sigma != acc_t(0)) {
      float* dst = std::is_same_v<acc_t, float> ? reinterpret_cast<float*>(bz) : normals;
      normal_range<V>(key, static_cast<uint32_t>(sample + static_cast<int64_t>(a.sample_offset)), first, count, dst);
      if constexpr (!std::is_same_v<acc_t, float>) std::copy(normals, normals + count, bz);
      z = bz;
    }

    const int64_t offset = sample * a.features + first;
    T* out_t = static_cast<T*>(a.out) + offset;
    T* aux_t = a.aux_kind == AuxOutput::kNone ? nullptr : static_cast<T*>(a.aux) + offset;
    acc_t* out = std::is_same_v<T, acc_t> ? reinterpret_cast<acc_t*>(out_t) : bout;
    acc_t* x0 = (std::is_same_v<T, acc_t> && a.aux_kind == AuxOutput::kX0) ? reinterpret_cast<acc_t*>(aux_t) : baux;
    // Stream noise is skipped for rows with sigma = 0 (as in the per-thread body): z is 0 there.
    const bool quiet = a.noise_source == NoiseSource::kStream && row.sigma == acc_t(0);
    (quiet ? quiet_fn : chunk_fn)(row, x, m, m_uncond, g, v, z, out, x0, count);
    if constexpr (!std::is_same_v<T, acc_t>) store_converted<V>(out_t, out, count);
    if (a.aux_kind == AuxOutput::kX0 && x0 == baux) store_converted<V>(aux_t, baux, count);
    if (a.aux_kind == AuxOutput::kNoise) store_converted<V>(aux_t, z, count);
  }
}

template <class V>
void fused_step_entry(const FusedStepArgs& a, int64_t begin, int64_t end) {
  switch (static_cast<c10::ScalarType>(a.dtype)) {
    case c10::ScalarType::Float:
      return fused_step_items<V, float, float>(a, begin, end);
    case c10::ScalarType::Double:
      return fused_step_items<V, double, double>(a, begin, end);
    case c10::ScalarType::Half:
      return fused_step_items<V, c10::Half, float>(a, begin, end);
    case c10::ScalarType::BFloat16:
      return fused_step_items<V, c10::BFloat16, float>(a, begin, end);
    default:
      TORCH_CHECK(false, "diffkern: unsupported dtype for the fused step");
  }
}

}  // namespace simd
DK_NAMESPACE_END
