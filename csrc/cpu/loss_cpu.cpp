// CPU kernels of the fused training loss (diffkern/loss_math.h): the SIMD units (simd/loss_simd.h)
// when the CPU has them, otherwise the per-thread bodies run index by index (what CUDA threads run).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../loss_common.h"
#include "isa_dispatch.h"

namespace diffkern {
namespace cpu {
namespace {

// The forward as the CUDA blocks compute it: every lane of every (sample, chunk), the tree, the
// chunks in order.
template <class T, class acc_t>
void loss_forward_scalar(const LossArgs& a, int64_t begin, int64_t end) {
  acc_t partial[kLossLanes];
  for (int64_t n = begin; n < end; ++n) {
    const LossRow<acc_t> row = loss_row<acc_t>(a, n);
    acc_t total = acc_t(0);
    for (int64_t c = 0; c < loss_chunks(a.features); ++c) {
      for (int lane = 0; lane < kLossLanes; ++lane) partial[lane] = loss_lane_sum<T, acc_t>(a, row, n, c, lane);
      for (int stride = kLossLanes / 2; stride > 0; stride /= 2)
        for (int lane = 0; lane < stride; ++lane) trace_tree_level(partial, lane, stride);
      total = total + partial[0];
    }
    a.loss_out[n] = row.weight * static_cast<double>(total);
  }
}

void run(const LossArgs& a, Isa isa, bool backward) {
  if (a.batch == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.features));
  if (isa == Isa::kScalar) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                    "diffkern::training_loss", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      if (backward) {
        const int64_t blocks = (a.features + 3) / 4;
        at::parallel_for(0, a.batch * blocks, 2048, [&](int64_t begin, int64_t end) {
          for (int64_t thread = begin; thread < end; ++thread) loss_backward_block<scalar_t, acc_t>(thread, a);
        });
      } else {
        at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
          loss_forward_scalar<scalar_t, acc_t>(a, begin, end);
        });
      }
    });
    return;
  }
  at::parallel_for(0, a.batch, grain, [&](int64_t begin, int64_t end) {
    if (isa == Isa::kAvx512) {
      training_loss_avx512(a, begin, end, backward);
    } else {
      training_loss_avx2(a, begin, end, backward);
    }
  });
}

at::Tensor training_loss_on(Isa isa, DK_TRAINING_LOSS_PARAMS) {
  TORCH_CHECK(x0.device().is_cpu(), "diffkern::training_loss: CPU kernel called for ", x0.device());
  TrainingLoss s = prepare_training_loss_forward(DK_TRAINING_LOSS_ARGS);
  run(s.args, isa, false);
  return s.loss;
}

at::Tensor training_loss_cpu(DK_TRAINING_LOSS_PARAMS) { return training_loss_on(best_isa(), DK_TRAINING_LOSS_ARGS); }

std::vector<at::Tensor> backward_on(Isa isa, const at::Tensor& grad_loss, DK_TRAINING_LOSS_PARAMS,
                                    std::array<bool, 3> output_mask) {
  TORCH_CHECK(x0.device().is_cpu(), "diffkern::training_loss_backward: CPU kernel called for ", x0.device());
  TrainingLoss s = prepare_training_loss_backward(grad_loss, DK_TRAINING_LOSS_ARGS, output_mask);
  run(s.args, isa, true);
  return s.grads;
}

std::vector<at::Tensor> training_loss_backward_cpu(const at::Tensor& grad_loss, DK_TRAINING_LOSS_PARAMS,
                                                   std::array<bool, 3> output_mask) {
  return backward_on(best_isa(), grad_loss, DK_TRAINING_LOSS_ARGS, output_mask);
}

// Test hooks: forward and backward on a chosen instruction set ("scalar" is the CUDA thread bodies).
at::Tensor training_loss_cpu_isa(DK_TRAINING_LOSS_PARAMS, c10::string_view isa) {
  return training_loss_on(isa_from_name(std::string(isa).c_str()), DK_TRAINING_LOSS_ARGS);
}

std::vector<at::Tensor> training_loss_backward_cpu_isa(const at::Tensor& grad_loss, DK_TRAINING_LOSS_PARAMS,
                                                       std::array<bool, 3> output_mask, c10::string_view isa) {
  return backward_on(isa_from_name(std::string(isa).c_str()), grad_loss, DK_TRAINING_LOSS_ARGS, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("training_loss", &training_loss_cpu);
  m.impl("training_loss_backward", &training_loss_backward_cpu);
  m.impl("_training_loss_cpu_isa", &training_loss_cpu_isa);
  m.impl("_training_loss_backward_cpu_isa", &training_loss_backward_cpu_isa);
}

}  // namespace cpu
}  // namespace diffkern
