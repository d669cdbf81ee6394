// Entry points of the CPU kernels compiled for a specific instruction set (isa_avx2.cpp,
// isa_avx512.cpp) and the run-time choice between them. This header is ISA-neutral: it passes only
// plain data, never the types of the versioned diffkern headers (see DK_ISA in macros.h).
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>

#include "diffkern/poisson_field.h"
#include "diffkern/step_args.h"

namespace diffkern {
namespace cpu {

enum class Isa { kScalar, kAvx2, kAvx512 };

// The best ISA this CPU supports, unless DIFFKERN_CPU_ISA (scalar | avx2 | avx512) asks for a
// lower one.
Isa best_isa();
const char* isa_name(Isa isa);
// Parses "auto", "scalar", "avx2", "avx512"; throws for unknown names or ISAs this CPU lacks.
Isa isa_from_name(const char* name);

// kBits: the raw Philox words, stored as the bit patterns of floats (random_bits' int32 output).
enum class Distribution { kNormal, kRademacher, kBits };

// Values of the noise stream (standard normals or Rademacher signs) for blocks [begin, end) of a
// contiguous [rows, row_size] output (see diffkern/noise_fill.h for the index space).
struct NoiseFillArgs {
  void* out;
  c10::ScalarType dtype;  // float, double, half or bfloat16
  Distribution distribution;
  int64_t rows, row_size;
  uint32_t key0, key1, step, stream;
  uint64_t sample_offset;
  int64_t begin, end;
};

void fill_noise_avx2(const NoiseFillArgs& args);
void fill_noise_avx512(const NoiseFillArgs& args);

// The fused step (diffkern/step_math.h) for work items [begin, end). An item is about
// kCpuStepChunk elements: one chunk of one sample when samples are at least that large, else a
// group of whole consecutive samples (so a step over many small samples is not a loop over
// samples: noise, coefficients and the formula run across samples).
constexpr int64_t kCpuStepChunk = 512;

// The samples and features one work item covers: samples [sample, sample + samples), features
// [first, first + count) of each.
struct StepRun {
  int64_t sample, samples, first, count;
};

struct StepItems {
  int64_t samples_per_item;   // > 1 only when chunks_per_sample == 1
  int64_t chunks_per_sample;  // chunks of kCpuStepChunk features
  int64_t count;              // number of items

  static StepItems of(int64_t batch, int64_t features) {
    if (features >= kCpuStepChunk || features == 0) {
      const int64_t chunks = (features + kCpuStepChunk - 1) / kCpuStepChunk;
      return StepItems{1, chunks, batch * chunks};
    }
    const int64_t samples = kCpuStepChunk / features;
    return StepItems{samples, 1, (batch + samples - 1) / samples};
  }

  StepRun run(int64_t item, int64_t batch, int64_t features) const {
    if (samples_per_item > 1) {
      const int64_t sample = item * samples_per_item;
      return StepRun{sample, std::min(samples_per_item, batch - sample), 0, features};
    }
    const int64_t first = (item % chunks_per_sample) * kCpuStepChunk;
    return StepRun{item / chunks_per_sample, 1, first, std::min(kCpuStepChunk, features - first)};
  }
};

void fused_step_avx2(const FusedStepArgs& args, int64_t begin, int64_t end);
void fused_step_avx512(const FusedStepArgs& args, int64_t begin, int64_t end);

// The widened fused step (diffkern/linear_step.h), over the same work items.
void linear_step_avx2(const LinearStepArgs& args, int64_t begin, int64_t end);
void linear_step_avx512(const LinearStepArgs& args, int64_t begin, int64_t end);

// The fused training loss (diffkern/loss_math.h), forward or backward, for samples [begin, end).
void training_loss_avx2(const LossArgs& args, int64_t begin, int64_t end, bool backward);
void training_loss_avx512(const LossArgs& args, int64_t begin, int64_t end, bool backward);

// The Poisson field (diffkern/poisson_field.h) of points [begin, end), the charges read from the
// [features, count] copy charges_t.
void poisson_field_avx2(const FieldArgs& args, const void* charges_t, int64_t begin, int64_t end);
void poisson_field_avx512(const FieldArgs& args, const void* charges_t, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace diffkern
