// Host-side argument checks and layouts shared by the CPU and CUDA launchers of the noise ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>

#include "diffkern/noise.h"
#include "diffkern/noise_fill.h"

namespace diffkern {

constexpr int64_t kMaxSamples = int64_t{1} << 32;         // sample index is one 32-bit counter word
constexpr int64_t kMaxFeatures = int64_t{1} << 34;        // block index j / 4 is one 32-bit word
constexpr int64_t kMaxCounterWord = int64_t{1} << 32;

// Dim 0 is the batch (a 0-d shape is one sample); the remaining dims are one sample's features.
inline FillShape fill_shape_for(at::IntArrayRef size, int64_t sample_offset) {
  for (const int64_t s : size) TORCH_CHECK(s >= 0, "diffkern: negative size in ", size);
  const int64_t rows = size.empty() ? 1 : size[0];
  int64_t row_size = 1;
  for (size_t d = 1; d < size.size(); ++d) row_size *= size[d];
  TORCH_CHECK(row_size <= kMaxFeatures, "diffkern: at most 2^34 features per sample, got ", row_size);
  TORCH_CHECK(sample_offset >= 0 && sample_offset + rows <= kMaxSamples,
              "diffkern: sample_offset + batch size must lie in [0, 2^32], got sample_offset=",
              sample_offset, " and batch size ", rows);
  return FillShape{rows, row_size, (row_size + 3) / 4};
}

inline NoiseParams noise_params_for(int64_t seed, int64_t step, int64_t sample_offset, int64_t stream,
                                    const std::optional<at::Tensor>& seed_step, at::Device device) {
  TORCH_CHECK(step >= 0 && step < kMaxCounterWord, "diffkern: step must lie in [0, 2^32), got ", step);
  TORCH_CHECK(stream >= 0 && stream < kMaxCounterWord, "diffkern: stream must lie in [0, 2^32), got ",
              stream);
  const int64_t* seed_step_ptr = nullptr;
  if (seed_step.has_value()) {
    const at::Tensor& t = *seed_step;
    TORCH_CHECK(t.scalar_type() == at::kLong && t.numel() == 2 && t.is_contiguous(),
                "diffkern: seed_step must be a contiguous int64 tensor of 2 elements (seed, step), got ",
                t.scalar_type(), " with ", t.numel(), " elements");
    TORCH_CHECK(t.device() == device, "diffkern: seed_step is on ", t.device(),
                " but the kernel runs on ", device);
    seed_step_ptr = t.const_data_ptr<int64_t>();
  }
  return NoiseParams{static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                     static_cast<uint32_t>(stream), static_cast<uint64_t>(sample_offset),
                     seed_step_ptr};
}

// The output and parameters of a randn / random_bits call, checked.
struct NoiseFill {
  at::Tensor out;
  FillShape shape;
  NoiseParams params;
};

inline NoiseFill prepare_noise_fill(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                                    int64_t stream, const std::optional<at::Tensor>& seed_step,
                                    at::ScalarType dtype, at::Device device) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(size);
  const FillShape shape = fill_shape_for(sizes, sample_offset);
  const NoiseParams params = noise_params_for(seed, step, sample_offset, stream, seed_step, device);
  return NoiseFill{at::empty(sizes, at::TensorOptions().dtype(dtype).device(device)), shape, params};
}

inline void check_philox_inputs(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "diffkern: philox4x32_10 takes int64 counter and key tensors");
  TORCH_CHECK(counter.dim() >= 1 && counter.size(-1) == 4, "diffkern: counter must have shape [..., 4]");
  TORCH_CHECK(key.dim() >= 1 && key.size(-1) == 2 && key.numel() / 2 == counter.numel() / 4,
              "diffkern: key must have shape [..., 2] with as many rows as counter");
  TORCH_CHECK(key.device() == counter.device(), "diffkern: counter and key on different devices");
}

}  // namespace diffkern
