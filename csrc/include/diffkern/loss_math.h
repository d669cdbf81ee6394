// The fused training loss: one formula for the objectives of diffusion, score-matching and flow
// models (diffkern/coefficients.py derives their rows; diffkern/training says which is which):
//
//     r_nj   = p_m m_nj + p_x0 x0_nj + p_z z_nj           (the residual: prediction minus target)
//     loss_n = weight_n * sum_j r_nj^2
//
// m is the model output, x0 the clean sample and z the noise that made the model's input, drawn
// again from the stream (seed, step, sample_offset + n, stream) as the fused q_sample drew it, or a
// given tensor. Nothing of the size of x0 is kept between the loss and its backward,
//     d loss_n / d m_nj = 2 weight_n r_nj p_m   (and p_x0, p_z for x0 and a given noise),
// which draws the noise again. Terms with a zero coefficient are absent (add_term).
//
// The sum over features runs in one fixed order on every device: the features are cut into chunks
// of kLossChunk; in a chunk, lane l (of kLossLanes) adds the blocks of 4 features g = l,
// l + kLossLanes, ... in increasing g, the 4 features of a block in increasing order; the lanes are
// combined by the binary tree of trace_math.h (stride kLossLanes / 2, then half of that, ...); the
// chunks are added in increasing order; the total is multiplied by weight in float64. CUDA gives
// each (sample, chunk) a block of kLossLanes threads, each thread one lane (one Philox call per
// block of 4 features); the CPU adds the same numbers in the same order, so the two agree bit for
// bit. Accumulation is float32 for half types and float32, float64 for float64.
#pragma once

#include "diffkern/macros.h"
#include "diffkern/noise.h"
#include "diffkern/noise_fill.h"
#include "diffkern/step_args.h"
#include "diffkern/step_body.h"
#include "diffkern/step_math.h"
#include "diffkern/trace_math.h"

DK_NAMESPACE_BEGIN

// The fields of a loss row, in memory order (diffkern/coefficients.py reads this list through
// torch.ops.diffkern.loss_row_fields).
#define DK_LOSS_ROW_FIELDS(X) X(model_output) X(x0) X(noise) X(weight)
#define DK_LOSS_ROW_COUNT(name) +1
constexpr int kLossRowSize = 0 DK_LOSS_ROW_FIELDS(DK_LOSS_ROW_COUNT);
#undef DK_LOSS_ROW_COUNT

constexpr int kLossLanes = kTraceLanes;
constexpr int64_t kLossChunk = 4 * 8 * kLossLanes;  // 8 blocks of 4 features per lane

DK_INLINE int64_t loss_chunks(int64_t features) { return features == 0 ? 1 : (features + kLossChunk - 1) / kLossChunk; }

template <class acc_t>
struct LossRow {
  acc_t model_output, x0, noise;
  double weight;
};

template <class acc_t>
DK_INLINE LossRow<acc_t> loss_row(const LossArgs& a, int64_t n) {
  const double* p = a.table + (a.table_rows == 1 ? 0 : n) * kLossRowSize;
  return LossRow<acc_t>{static_cast<acc_t>(p[0]), static_cast<acc_t>(p[1]), static_cast<acc_t>(p[2]), p[3]};
}

DK_INLINE NoiseParams loss_noise_params(const LossArgs& a) {
  return NoiseParams{a.seed, a.step, a.stream, a.sample_offset, a.seed_step};
}

// The residual of one element.
template <class acc_t>
DK_INLINE acc_t loss_residual(const LossRow<acc_t>& row, acc_t m, acc_t x0, acc_t z) {
  return add_term(row.model_output, m, add_term(row.x0, x0, term(row.noise, z)));
}

// The four residuals of block `block` (features 4 block .. 4 block + 3) of sample n; count of them
// exist (the rest are 0).
template <class T, class acc_t>
DK_INLINE int64_t loss_block_residuals(const LossArgs& a, const LossRow<acc_t>& row, int64_t n, int64_t block,
                                       acc_t (&r)[4]) {
  const int64_t first = 4 * block;
  const int64_t count = a.features - first < 4 ? a.features - first : 4;
  acc_t m[4], x0[4], z[4];
  load_block<T>(a.m, n, first, count, m);
  load_block<T>(a.x0, n, first, count, x0);
  load_block<T>(a.noise, n, first, count, z);  // zeros unless noise_source is kTensor
  if (a.noise_source == NoiseSource::kStream && row.noise != acc_t(0)) {
    const Float4 normal = noise_normal4(resolve_noise_key(loss_noise_params(a)), static_cast<uint32_t>(block),
                                        static_cast<uint32_t>(n + static_cast<int64_t>(a.sample_offset)));
    for (int k = 0; k < 4; ++k) z[k] = static_cast<acc_t>(normal.v[k]);
  }
  for (int k = 0; k < 4; ++k) r[k] = loss_residual(row, m[k], x0[k], z[k]);
  return count;
}

// Per-thread body of the forward: lane `lane`'s sum of squares over chunk c of sample n (what one
// CUDA thread adds; the CPU scalar path calls it for every lane).
template <class T, class acc_t>
DK_INLINE acc_t loss_lane_sum(const LossArgs& a, const LossRow<acc_t>& row, int64_t n, int64_t c, int lane) {
  const int64_t first_block = c * (kLossChunk / 4);
  const int64_t end_block = (a.features + 3) / 4 < first_block + kLossChunk / 4 ? (a.features + 3) / 4
                                                                               : first_block + kLossChunk / 4;
  acc_t sum = acc_t(0);
  for (int64_t block = first_block + lane; block < end_block; block += kLossLanes) {
    acc_t r[4];
    const int64_t count = loss_block_residuals<T>(a, row, n, block, r);
    for (int64_t k = 0; k < count; ++k) sum = sum + r[k] * r[k];
  }
  return sum;
}

// Per-thread body of the backward: the gradients of one block of 4 features of one sample.
template <class T, class acc_t>
DK_INLINE void loss_backward_block(int64_t thread, const LossArgs& a) {
  const int64_t blocks_per_row = (a.features + 3) / 4;
  int64_t n, block;
  split_thread_index(thread, blocks_per_row, n, block);
  const LossRow<acc_t> row = loss_row<acc_t>(a, n);
  acc_t r[4];
  const int64_t count = loss_block_residuals<T>(a, row, n, block, r);
  const acc_t scale = static_cast<acc_t>(2.0 * row.weight * a.grad_loss[n]);
  const int64_t offset = n * a.features + 4 * block;
  const acc_t coefficients[3] = {row.model_output, row.x0, row.noise};
  void* const outputs[3] = {a.grad_m, a.grad_x0, a.grad_noise};
  for (int i = 0; i < 3; ++i) {
    if (outputs[i] == nullptr) continue;
    Pack4<T> pack;
    for (int k = 0; k < 4; ++k) pack.v[k] = static_cast<T>(term(coefficients[i], scale * r[k]));
    store_pack(static_cast<T*>(outputs[i]) + offset, pack, count);
  }
}

DK_NAMESPACE_END
