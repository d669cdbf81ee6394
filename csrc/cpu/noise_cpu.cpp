// CPU kernels of the noise ops. The scalar path runs the per-thread body of diffkern/noise_fill.h
// over every index, exactly what a CUDA thread runs; the SIMD paths (isa_avx2.cpp,
// isa_avx512.cpp) compute 8 or 16 Philox blocks per instruction and are bitwise identical to it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <string>

#include "../ops_common.h"
#include "isa_dispatch.h"

namespace diffkern {
namespace cpu {
namespace {

constexpr int64_t kGrainBlocks = 2048;  // 8K values per task: large enough to amortise a task

template <typename T, typename Generator>
void fill_scalar(T* out, const FillShape& shape, const NoiseParams& params, Generator generate) {
  at::parallel_for(0, shape.num_threads(), kGrainBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) fill_block(thread, out, shape, params, generate);
  });
}

template <typename T>
void fill_noise(T* out, at::ScalarType dtype, const FillShape& shape, const NoiseParams& params, Isa isa,
                Distribution distribution) {
  if (isa == Isa::kScalar) {
    if (distribution == Distribution::kRademacher) return fill_scalar(out, shape, params, RademacherGenerator<T>{});
    return fill_scalar(out, shape, params, NormalGenerator<T>{});
  }
  const NoiseKey key = resolve_noise_key(params);
  at::parallel_for(0, shape.num_threads(), kGrainBlocks, [&](int64_t begin, int64_t end) {
    const NoiseFillArgs args{out,      dtype,    distribution, shape.rows,           shape.row_size, key.key0,
                             key.key1, key.step, key.stream,   params.sample_offset, begin,          end};
    if (isa == Isa::kAvx512) {
      fill_noise_avx512(args);
    } else {
      fill_noise_avx2(args);
    }
  });
}

at::Tensor noise_impl(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset, int64_t stream,
                      const std::optional<at::Tensor>& seed_step, at::ScalarType dtype, Isa isa,
                      Distribution distribution) {
  NoiseFill fill = prepare_noise_fill(size, seed, step, sample_offset, stream, seed_step, dtype, at::kCPU);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diffkern::randn", [&] {
    fill_noise(fill.out.mutable_data_ptr<scalar_t>(), dtype, fill.shape, fill.params, isa, distribution);
  });
  return fill.out;
}

at::Tensor randn_cpu(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                     int64_t stream, const std::optional<at::Tensor>& seed_step, at::ScalarType dtype,
                     at::Device device) {
  TORCH_CHECK(device.is_cpu(), "diffkern::randn: CPU kernel called for device ", device);
  return noise_impl(size, seed, step, sample_offset, stream, seed_step, dtype, best_isa(), Distribution::kNormal);
}

at::Tensor rademacher_cpu(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                          int64_t stream, const std::optional<at::Tensor>& seed_step, at::ScalarType dtype,
                          at::Device device) {
  TORCH_CHECK(device.is_cpu(), "diffkern::rademacher: CPU kernel called for device ", device);
  return noise_impl(size, seed, step, sample_offset, stream, seed_step, dtype, best_isa(), Distribution::kRademacher);
}

// Test hook: randn / rademacher on a chosen instruction set, to compare the paths bitwise.
at::Tensor noise_cpu_isa(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                         int64_t stream, at::ScalarType dtype, c10::string_view isa, bool rademacher) {
  return noise_impl(size, seed, step, sample_offset, stream, std::nullopt, dtype,
                    isa_from_name(std::string(isa).c_str()),
                    rademacher ? Distribution::kRademacher : Distribution::kNormal);
}

at::Tensor random_bits_cpu(c10::SymIntArrayRef size, int64_t seed, int64_t step, int64_t sample_offset,
                           int64_t stream, const std::optional<at::Tensor>& seed_step, at::Device device) {
  TORCH_CHECK(device.is_cpu(), "diffkern::random_bits: CPU kernel called for device ", device);
  NoiseFill fill = prepare_noise_fill(size, seed, step, sample_offset, stream, seed_step, at::kInt, at::kCPU);
  const Isa isa = best_isa();
  if (isa == Isa::kScalar) {
    fill_scalar(fill.out.mutable_data_ptr<int32_t>(), fill.shape, fill.params, BitsGenerator{});
  } else {  // the SIMD fill moves the words as float bit patterns into the int32 output
    fill_noise(reinterpret_cast<float*>(fill.out.mutable_data_ptr<int32_t>()), at::kFloat, fill.shape, fill.params,
               isa, Distribution::kBits);
  }
  return fill.out;
}

at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_inputs(counter, key);
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t* kp = k.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, c.numel() / 4, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) philox_table_row(i, cp, kp, op);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("randn", &randn_cpu);
  m.impl("rademacher", &rademacher_cpu);
  m.impl("random_bits", &random_bits_cpu);
  m.impl("philox4x32_10", &philox4x32_10_cpu);
}

// No tensor arguments: registered as the catch-all so it is reachable without a device key.
TORCH_LIBRARY_IMPL(diffkern, CompositeExplicitAutograd, m) {
  m.impl("_noise_cpu_isa", &noise_cpu_isa);
}

}  // namespace cpu
}  // namespace diffkern
