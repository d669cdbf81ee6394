// The fused training loss on the CPU (diffkern/loss_math.h): for a group of samples (or one chunk
// of a large sample) the noise is drawn W blocks at a time (noise_simd.h) into a buffer, the
// residuals run in loops the compiler vectorises, and the sums follow the lanes and tree of the
// per-thread body, so the result is bitwise that of the scalar path and of CUDA. Included only by
// the per-ISA TUs (isa_unit.inc), after their target pragma.
#pragma once

#include <algorithm>
#include <type_traits>

#include "../isa_dispatch.h"
#include "diffkern/loss_math.h"
#include "noise_simd.h"
#include "step_simd.h"

DK_NAMESPACE_BEGIN
namespace simd {

// Samples of fewer features than a chunk are taken kLossChunk / features at a time.
inline int64_t loss_group(int64_t features) {
  return features >= kLossChunk || features == 0 ? 1 : kLossChunk / features;
}

// The noise of elements [first, first + count) of samples [n, n + samples) (count = features when
// samples > 1) as acc_t: the given tensor, the stream, or zeros.
template <class V, class T, class acc_t>
const acc_t* loss_noise(const LossArgs& a, int64_t n, int64_t samples, int64_t first, int64_t count, acc_t* buf,
                        float* normals, const acc_t* zeros) {
  if (a.noise_source == NoiseSource::kTensor) return run_of<T>(a.noise, a.features, n, samples, first, count, buf, zeros);
  if (a.noise_source != NoiseSource::kStream) return zeros;
  const FillShape shape{a.batch, a.features, (a.features + 3) / 4};
  float* dst = std::is_same_v<acc_t, float> ? reinterpret_cast<float*>(buf) : normals;
  const int64_t first_block = n * shape.blocks_per_row + first / 4;
  const int64_t last_block = (n + samples - 1) * shape.blocks_per_row + (first + count + 3) / 4;
  fill<V, NormalDraw>(dst, n * a.features + first, shape, resolve_noise_key(loss_noise_params(a)), a.sample_offset,
                      first_block, last_block);
  if constexpr (!std::is_same_v<acc_t, float>) std::copy(normals, normals + samples * count, buf);
  return buf;
}

// The squared residuals of `count` elements, padded with zeros to what chunk_sum reads: whole blocks
// of 4 within the first round of the lanes, whole rounds beyond it (a 2-feature sample pads to 4,
// not to a round of 4 kLossLanes).
template <class acc_t>
int64_t squared_residuals(const LossRow<acc_t> row, const acc_t* __restrict__ m, const acc_t* __restrict__ x0,
                          const acc_t* __restrict__ z, acc_t* __restrict__ r2, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    const acc_t r = loss_residual(row, m[k], x0[k], z[k]);
    r2[k] = r * r;
  }
  constexpr int64_t round = 4 * kLossLanes;
  const int64_t padded = count <= round ? (count + 3) / 4 * 4 : (count + round - 1) / round * round;
  for (int64_t k = count; k < padded; ++k) r2[k] = acc_t(0);
  return padded;
}

// One chunk's sum of the per-thread bodies' lanes and tree: lane l adds r2[4 (l + kLossLanes i) + e]
// for rounds i and e = 0..3 in that order (the padding adds exact zeros), then the tree over the
// lanes that hold a block (the others are 0, which the tree's upper levels would add exactly).
template <class acc_t>
acc_t chunk_sum(const acc_t* __restrict__ r2, int64_t count, int64_t padded) {
  alignas(64) acc_t partial[kLossLanes];
  const int64_t blocks = (count + 3) / 4;
  const int lanes = static_cast<int>(std::min<int64_t>(kLossLanes, blocks));
  for (int l = 0; l < lanes; ++l) partial[l] = acc_t(0);
  for (int64_t base = 0; base < padded; base += 4 * kLossLanes)
    for (int e = 0; e < 4; ++e)
      for (int l = 0; l < lanes; ++l) partial[l] = partial[l] + r2[base + 4 * l + e];
  int used = 1;
  while (used < lanes) used *= 2;
  for (int l = lanes; l < used; ++l) partial[l] = acc_t(0);
  for (int stride = used / 2; stride > 0; stride /= 2)
    for (int l = 0; l < stride; ++l) trace_tree_level(partial, l, stride);
  return lanes == 0 ? acc_t(0) : partial[0];
}

// chunk_sum of a sample of at most one round of the lanes (count <= 4 kLossLanes): lane l holds block
// l alone, its 4 squares added to 0 in order (a short last block adds fewer: the padding's zeros would
// add exactly), then the tree over the lanes in use.
template <class acc_t>
DK_INLINE acc_t round_sum(const LossRow<acc_t> row, const acc_t* __restrict__ m, const acc_t* __restrict__ x0,
                const acc_t* __restrict__ z, int64_t count) {
  acc_t partial[kLossLanes];
  const int lanes = static_cast<int>((count + 3) / 4);
  const int full = static_cast<int>(count / 4);
  for (int l = 0; l < full; ++l) {
    acc_t r[4];
    for (int e = 0; e < 4; ++e) r[e] = loss_residual(row, m[4 * l + e], x0[4 * l + e], z[4 * l + e]);
    partial[l] = (((acc_t(0) + r[0] * r[0]) + r[1] * r[1]) + r[2] * r[2]) + r[3] * r[3];
  }
  if (full < lanes) {
    acc_t sum = acc_t(0);
    for (int64_t k = 4 * full; k < count; ++k) {
      const acc_t r = loss_residual(row, m[k], x0[k], z[k]);
      sum = sum + r * r;
    }
    partial[full] = sum;
  }
  if (lanes <= 1) return lanes == 0 ? acc_t(0) : partial[0];
  int used = 1;
  while (used < lanes) used *= 2;
  for (int l = lanes; l < used; ++l) partial[l] = acc_t(0);
  for (int stride = used / 2; stride > 0; stride /= 2)
    for (int l = 0; l < stride; ++l) trace_tree_level(partial, l, stride);
  return partial[0];
}

// Per-sample losses of samples [begin, end).
template <class V, class T, class acc_t>
void loss_forward(const LossArgs& a, int64_t begin, int64_t end) {
  alignas(64) acc_t zeros[kLossChunk] = {};
  alignas(64) acc_t bm[kLossChunk], bx[kLossChunk], bz[kLossChunk], r2[kLossChunk];
  alignas(64) float normals[kLossChunk];
  const int64_t group = loss_group(a.features);
  for (int64_t n0 = begin; n0 < end; n0 += group) {
    const int64_t samples = std::min(group, end - n0);
    if (samples > 1 || a.features <= kLossChunk) {  // whole samples, one chunk each
      const int64_t count = a.features;
      const acc_t* m = run_of<T>(a.m, a.features, n0, samples, 0, count, bm, zeros);
      const acc_t* x0 = run_of<T>(a.x0, a.features, n0, samples, 0, count, bx, zeros);
      const acc_t* z = loss_noise<V, T>(a, n0, samples, 0, count, bz, normals, zeros);
      if (count <= 4) {  // one block, one lane, no tree: the lane's running sum is the loss
        for (int64_t s = 0; s < samples; ++s) {
          const LossRow<acc_t> row = loss_row<acc_t>(a, n0 + s);
          acc_t sum = acc_t(0);
          for (int64_t k = s * count; k < (s + 1) * count; ++k) {
            const acc_t r = loss_residual(row, m[k], x0[k], z[k]);
            sum = sum + r * r;
          }
          a.loss_out[n0 + s] = row.weight * static_cast<double>(acc_t(0) + sum);
        }
        continue;
      }
      if (count <= 4 * kLossLanes) {  // one round of the lanes: without chunk_sum's padding per sample
        for (int64_t s = 0; s < samples; ++s) {
          const LossRow<acc_t> row = loss_row<acc_t>(a, n0 + s);
          const int64_t k = s * count;
          a.loss_out[n0 + s] = row.weight * static_cast<double>(acc_t(0) + round_sum(row, m + k, x0 + k, z + k, count));
        }
        continue;
      }
      for (int64_t s = 0; s < samples; ++s) {
        const LossRow<acc_t> row = loss_row<acc_t>(a, n0 + s);
        const int64_t k = s * count;
        const int64_t padded = squared_residuals(row, m + k, x0 + k, z + k, r2, count);
        a.loss_out[n0 + s] = row.weight * static_cast<double>(acc_t(0) + chunk_sum(r2, count, padded));
      }
      continue;
    }
    const LossRow<acc_t> row = loss_row<acc_t>(a, n0);
    acc_t total = acc_t(0);
    for (int64_t first = 0; first < a.features; first += kLossChunk) {
      const int64_t count = std::min(kLossChunk, a.features - first);
      const acc_t* m = run_of<T>(a.m, a.features, n0, 1, first, count, bm, zeros);
      const acc_t* x0 = run_of<T>(a.x0, a.features, n0, 1, first, count, bx, zeros);
      const acc_t* z = loss_noise<V, T>(a, n0, 1, first, count, bz, normals, zeros);
      const int64_t padded = squared_residuals(row, m, x0, z, r2, count);
      total = total + chunk_sum(r2, count, padded);
    }
    a.loss_out[n0] = row.weight * static_cast<double>(total);
  }
}

template <class acc_t>
void loss_gradients(const LossRow<acc_t> row, acc_t scale, const acc_t* __restrict__ m, const acc_t* __restrict__ x0,
                    const acc_t* __restrict__ z, acc_t* __restrict__ gm, acc_t* __restrict__ gx,
                    acc_t* __restrict__ gz, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    const acc_t r = scale * loss_residual(row, m[k], x0[k], z[k]);
    gm[k] = term(row.model_output, r);
    gx[k] = term(row.x0, r);
    gz[k] = term(row.noise, r);
  }
}

// The gradients of samples [begin, end).
template <class V, class T, class acc_t>
void loss_backward(const LossArgs& a, int64_t begin, int64_t end) {
  alignas(64) acc_t zeros[kLossChunk] = {};
  alignas(64) acc_t bm[kLossChunk], bx[kLossChunk], bz[kLossChunk], gm[kLossChunk], gx[kLossChunk], gz[kLossChunk];
  alignas(64) float normals[kLossChunk];
  const int64_t group = loss_group(a.features);
  void* const outputs[3] = {a.grad_m, a.grad_x0, a.grad_noise};
  acc_t* const values[3] = {gm, gx, gz};
  for (int64_t n0 = begin; n0 < end; n0 += group) {
    const int64_t samples = std::min(group, end - n0);
    for (int64_t first = 0; first < a.features; first += kLossChunk) {
      const int64_t count = samples > 1 ? a.features : std::min(kLossChunk, a.features - first);
      const acc_t* m = run_of<T>(a.m, a.features, n0, samples, first, count, bm, zeros);
      const acc_t* x0 = run_of<T>(a.x0, a.features, n0, samples, first, count, bx, zeros);
      const acc_t* z = loss_noise<V, T>(a, n0, samples, first, count, bz, normals, zeros);
      for (int64_t s = 0; s < samples; ++s) {
        const LossRow<acc_t> row = loss_row<acc_t>(a, n0 + s);
        const acc_t scale = static_cast<acc_t>(2.0 * row.weight * a.grad_loss[n0 + s]);
        const int64_t k = s * count;
        loss_gradients(row, scale, m + k, x0 + k, z + k, gm + k, gx + k, gz + k, count);
      }
      const int64_t offset = n0 * a.features + first;
      for (int i = 0; i < 3; ++i)
        if (outputs[i] != nullptr) store_converted<V>(static_cast<T*>(outputs[i]) + offset, values[i], samples * count);
      if (samples > 1) break;
    }
  }
}

template <class V>
void training_loss_entry(const LossArgs& a, int64_t begin, int64_t end, bool backward) {
  dispatch_step_dtype(a.dtype, [&]<class T, class acc_t>() {
    if (backward) {
      loss_backward<V, T, acc_t>(a, begin, end);
    } else {
      loss_forward<V, T, acc_t>(a, begin, end);
    }
  });
}

}  // namespace simd
DK_NAMESPACE_END
