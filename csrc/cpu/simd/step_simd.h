// The fused step on the CPU, chunk by chunk: for each (sample, chunk of features) the noise is
// generated W blocks at a time (noise_simd.h), inputs of other dtypes are converted into float
// buffers, and step_element (diffkern/step_math.h) runs in a loop the compiler vectorises for the
// unit's instruction set. Same operations as the per-thread body, so bitwise equal to it and to CUDA.
// Included only by the per-ISA TUs (isa_unit.inc), after their target pragma.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstddef>
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

// An input over the samples [sample, sample + samples) and features [first, first + count) of an
// item, as one run of acc_t: the tensor itself when it is acc_t and the run is contiguous, else
// converted (or gathered, for strided samples) into buf.
template <class T, class acc_t>
const acc_t* run_of(const StepInput& in, int64_t features, int64_t sample, int64_t samples, int64_t first,
                    int64_t count, acc_t* buf, const acc_t* zeros) {
  if (in.data == nullptr) return zeros;
  const T* p = static_cast<const T*>(in.data) + sample * in.row_stride + first;
  const bool contiguous = samples == 1 || in.row_stride == features;
  if constexpr (std::is_same_v<T, acc_t>) {
    if (contiguous) return p;
  }
  if (contiguous) {
    for (int64_t k = 0; k < samples * count; ++k) buf[k] = static_cast<acc_t>(p[k]);
  } else {
    for (int64_t s = 0; s < samples; ++s)
      for (int64_t k = 0; k < count; ++k) buf[s * count + k] = static_cast<acc_t>(p[s * in.row_stride + k]);
  }
  return buf;
}

// The coefficient row of element k when elements have rows of their own: row_offsets[k] is its
// offset in the table. Only the fields the formula reads are loaded (the rest are dead loads).
template <class acc_t>
inline StepRow<acc_t> row_of_element(const acc_t* __restrict__ table, const int32_t* __restrict__ row_offsets,
                                     int64_t k) {
  return load_step_row(table + row_offsets[k]);
}

// __restrict__ and the row by value let the compiler keep the coefficients in registers and drop the
// run-time alias checks that otherwise send it to its scalar fallback loop. With columns, each
// element reads its own row from them instead.
template <class Flags, class acc_t>
void step_chunk(const StepRow<acc_t> row, const acc_t* __restrict__ table, const int32_t* __restrict__ row_offsets,
                const acc_t* __restrict__ x,
                const acc_t* __restrict__ m, const acc_t* __restrict__ m_uncond, const acc_t* __restrict__ g,
                const acc_t* __restrict__ v, const acc_t* __restrict__ z, acc_t* __restrict__ out,
                acc_t* __restrict__ x0, int64_t count) {
  const Flags flags{};
#define DK_STEP_CHUNK_ELEMENT(row_of_k)                                                                  \
  for (int64_t k = 0; k < count; ++k) {                                                                 \
    acc_t x0_k;                                                                                          \
    out[k] = step_element(row_of_k, flags, x[k], m[k], Flags::guided ? m_uncond[k] : acc_t(0),           \
                          Flags::third ? g[k] : acc_t(0), Flags::learned_variance ? v[k] : acc_t(0),     \
                          Flags::noise ? z[k] : acc_t(0), x0_k);                                         \
    if (Flags::store_x0) x0[k] = x0_k;                                                                   \
  }
  // Two copies of the loop (not a lambda: its captures would hide __restrict__ from the vectoriser).
  if (row_offsets == nullptr) {
    DK_STEP_CHUNK_ELEMENT(row)
  } else {
    DK_STEP_CHUNK_ELEMENT(row_of_element(table, row_offsets, k))
  }
#undef DK_STEP_CHUNK_ELEMENT
}

template <class acc_t>
using StepChunkFn = void (*)(const StepRow<acc_t>, const acc_t*, const int32_t*, const acc_t*, const acc_t*,
                             const acc_t*, const acc_t*, const acc_t*, const acc_t*, acc_t*, acc_t*, int64_t);

// The chunk loop for run-time flags: picks one of the 64 instantiations, one flag at a time.
template <class acc_t, bool... kFixed, class... Rest>
StepChunkFn<acc_t> step_chunk_for(bool flag, Rest... rest) {
  if constexpr (sizeof...(Rest) == 0) {
    return flag ? step_chunk<FixedStepFlags<kFixed..., true>, acc_t> : step_chunk<FixedStepFlags<kFixed..., false>, acc_t>;
  } else {
    return flag ? step_chunk_for<acc_t, kFixed..., true>(rest...) : step_chunk_for<acc_t, kFixed..., false>(rest...);
  }
}

// True when every sample uses the same coefficient row.
inline bool one_row_for_all(const FusedStepArgs& a) { return a.rows == nullptr ? a.row >= 0 : a.rows_size == 1; }

// Samples of fewer features than this, each with its own row, get a row per element (the formula
// loop then gathers the coefficients) rather than one formula loop per sample.
constexpr int64_t kGatherBelow = 16;
constexpr int64_t kSigmaField = offsetof(StepRow<float>, sigma) / sizeof(float);

// Whether the table is small enough for 32-bit element offsets (the gathers are then 16 wide).
inline bool gather_rows_possible(const FusedStepArgs& a) {
  return a.features < kGatherBelow && a.table_rows < (int64_t{1} << 31) / kStepRowSize;
}

// The table offset of each element's row, for samples [sample, sample + samples).
inline void element_row_offsets(const FusedStepArgs& a, int64_t sample, int64_t samples, int32_t* offsets) {
  for (int64_t s = 0; s < samples; ++s) {
    const int32_t offset = static_cast<int32_t>(step_row_index(a, sample + s) * kStepRowSize);
    for (int64_t j = 0; j < a.features; ++j) offsets[s * a.features + j] = offset;
  }
}

// Work items [begin, end) of cpu::StepItems: item i is chunk i % chunks of sample i / chunks, or
// the group of samples_per_item samples starting at i * samples_per_item. Either way its elements
// are one contiguous run of the output; inside it the formula runs once per run of samples that
// share a coefficient row.
template <class V, class T, class acc_t>
void fused_step_items(const FusedStepArgs& a, int64_t begin, int64_t end) {
  const cpu::StepItems items = cpu::StepItems::of(a.batch, a.features);
  const FillShape shape{a.batch, a.features, (a.features + 3) / 4};
  const NoiseKey key = resolve_noise_key(step_noise_params(a));
  const bool any_noise = a.noise_source != NoiseSource::kNone;
  const bool uniform = one_row_for_all(a);
  const StepChunkFn<acc_t> chunk_fn = step_chunk_for<acc_t>(a.guided, a.clip, a.learned_variance, a.g.data != nullptr,
                                                            any_noise, a.aux_kind == AuxOutput::kX0);
  const StepChunkFn<acc_t> quiet_fn = step_chunk_for<acc_t>(a.guided, a.clip, a.learned_variance, a.g.data != nullptr,
                                                            false, a.aux_kind == AuxOutput::kX0);
  alignas(64) acc_t zeros[kStepChunk] = {};
  alignas(64) acc_t bx[kStepChunk], bm[kStepChunk], bmu[kStepChunk], bg[kStepChunk], bv[kStepChunk];
  alignas(64) acc_t bz[kStepChunk], bout[kStepChunk], baux[kStepChunk];
  alignas(64) float normals[kStepChunk];
  alignas(64) int32_t offsets[kStepChunk];
  const bool gather_by_element = gather_rows_possible(a);
  for (int64_t item = begin; item < end; ++item) {
    const auto [sample, samples, first, count] = items.run(item, a.batch, a.features);
    const int64_t elements = samples * count;

    const acc_t* x = run_of<T>(a.x, a.features, sample, samples, first, count, bx, zeros);
    const acc_t* m = run_of<T>(a.m, a.features, sample, samples, first, count, bm, zeros);
    const acc_t* m_uncond = run_of<T>(a.m_uncond, a.features, sample, samples, first, count, bmu, zeros);
    const acc_t* g = run_of<T>(a.g, a.features, sample, samples, first, count, bg, zeros);
    const acc_t* v = run_of<T>(a.v, a.features, sample, samples, first, count, bv, zeros);
    const acc_t* z = run_of<T>(a.noise, a.features, sample, samples, first, count, bz, zeros);
    const bool stream = a.noise_source == NoiseSource::kStream &&
                        !(uniform && step_row_for<acc_t>(a, step_row_index(a, sample)).sigma == acc_t(0));
    if (stream) {  // the normals of these elements: blocks of the (sample, block) space, in order
      float* dst = std::is_same_v<acc_t, float> ? reinterpret_cast<float*>(bz) : normals;
      const int64_t first_block = sample * shape.blocks_per_row + first / 4;
      const int64_t last_block = (sample + samples - 1) * shape.blocks_per_row + (first + count + 3) / 4;
      fill<V, NormalDraw>(dst, sample * a.features + first, shape, key, a.sample_offset, first_block, last_block);
      if constexpr (!std::is_same_v<acc_t, float>) std::copy(normals, normals + elements, bz);
      z = bz;
    }

    const int64_t offset = sample * a.features + first;
    T* out_t = static_cast<T*>(a.out) + offset;
    T* aux_t = a.aux_kind == AuxOutput::kNone ? nullptr : static_cast<T*>(a.aux) + offset;
    acc_t* out = std::is_same_v<T, acc_t> ? reinterpret_cast<acc_t*>(out_t) : bout;
    acc_t* x0 = (std::is_same_v<T, acc_t> && a.aux_kind == AuxOutput::kX0) ? reinterpret_cast<acc_t*>(aux_t) : baux;
    const acc_t* table = static_cast<const acc_t*>(a.table);
    const bool per_element = !uniform && samples > 1 && gather_by_element;
    if (per_element) {
      element_row_offsets(a, sample, samples, offsets);
      if (a.noise_source == NoiseSource::kStream)  // no noise for rows with sigma = 0 (as the per-thread body)
        for (int64_t k = 0; k < elements; ++k) bz[k] = table[offsets[k] + kSigmaField] == acc_t(0) ? acc_t(0) : bz[k];
      chunk_fn(StepRow<acc_t>{}, table, offsets, x, m, m_uncond, g, v, z, out, x0, elements);
    }
    for (int64_t s = 0; s < samples && !per_element;) {  // runs of samples sharing a row
      const int64_t index = step_row_index(a, sample + s);
      int64_t next = uniform ? samples : s + 1;
      while (next < samples && step_row_index(a, sample + next) == index) ++next;
      const StepRow<acc_t> row = step_row_for<acc_t>(a, index);
      const int64_t k = s * count, n = (next - s) * count;
      // Stream noise is skipped for rows with sigma = 0 (as in the per-thread body): z is 0 there.
      if (a.noise_source == NoiseSource::kStream && row.sigma == acc_t(0)) {
        if (z == bz) std::fill(bz + k, bz + k + n, acc_t(0));
        quiet_fn(row, table, nullptr, x + k, m + k, m_uncond + k, g + k, v + k, zeros, out + k, x0 + k, n);
      } else {
        chunk_fn(row, table, nullptr, x + k, m + k, m_uncond + k, g + k, v + k, z + k, out + k, x0 + k, n);
      }
      s = next;
    }
    if constexpr (!std::is_same_v<T, acc_t>) store_converted<V>(out_t, out, elements);
    if (a.aux_kind == AuxOutput::kX0 && x0 == baux) store_converted<V>(aux_t, baux, elements);
    if (a.aux_kind == AuxOutput::kNoise) store_converted<V>(aux_t, z, elements);
  }
}

// Calls f.template operator()<T, acc_t>() for the tensor dtype T of a step and its compute type.
template <class F>
void dispatch_step_dtype(int dtype, const F& f) {
  switch (static_cast<c10::ScalarType>(dtype)) {
    case c10::ScalarType::Float:
      return f.template operator()<float, float>();
    case c10::ScalarType::Double:
      return f.template operator()<double, double>();
    case c10::ScalarType::Half:
      return f.template operator()<c10::Half, float>();
    case c10::ScalarType::BFloat16:
      return f.template operator()<c10::BFloat16, float>();
    default:
      TORCH_CHECK(false, "diffkern: unsupported dtype for the fused step");
  }
}

template <class V>
void fused_step_entry(const FusedStepArgs& a, int64_t begin, int64_t end) {
  dispatch_step_dtype(a.dtype, [&]<class T, class acc_t>() { fused_step_items<V, T, acc_t>(a, begin, end); });
}

}  // namespace simd
DK_NAMESPACE_END
