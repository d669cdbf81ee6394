// Entry points of the CPU kernels compiled for a specific instruction set (isa_avx2.cpp,
// isa_avx512.cpp) and the run-time choice between them. This header is ISA-neutral: it passes only
// plain data, never the types of the versioned diffkern headers (see DK_ISA in macros.h).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

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

enum class Distribution { kNormal, kRademacher };

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

// The fused step (diffkern/step_math.h) for work items [begin, end): item i is chunk
// i % chunks of sample i / chunks, a chunk being kCpuStepChunk features (simd/step_simd.h).
constexpr int64_t kCpuStepChunk = 512;
void fused_step_avx2(const FusedStepArgs& args, int64_t begin, int64_t end);
void fused_step_avx512(const FusedStepArgs& args, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace diffkern
