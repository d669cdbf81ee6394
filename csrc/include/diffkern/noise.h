// The noise contract of diffkern (DESIGN.md, "Noise"): the random number for
// (seed, stream, step, sample n, feature j) is word j % 4 of
//     Philox4x32-10(counter = (j / 4, n, step, stream), key = (seed & 0xffffffff, seed >> 32)),
// and its standard normal is element j % 4 of normal4() of that block.
// "sample" is the global sample index (a kernel's row plus the caller's sample_offset) and
// "feature" the row-major index of an element within its sample (dim 0 is the batch), so the numbers
// do not depend on the device, the batch size or how a batch is split across calls.
#pragma once

#include "diffkern/macros.h"
#include "diffkern/normal.h"
#include "diffkern/philox.h"

DK_NAMESPACE_BEGIN

// The stream is any 32-bit value; the ids diffkern itself uses are named in one place,
// diffkern/noise.py.

// Where the numbers of a call come from. seed_step, when not null, points at two int64 values
// (seed, step) in the memory of the device that runs the kernel; it overrides seed and step so a
// captured CUDA graph draws new numbers when the caller updates that tensor between replays.
struct NoiseParams {
  uint64_t seed;
  uint64_t step;  // validated to fit 32 bits by the launchers
  uint32_t stream;
  uint64_t sample_offset;
  const int64_t* seed_step;
};

struct NoiseKey {
  uint32_t key0, key1;  // seed, low and high words
  uint32_t step, stream;
};

DK_INLINE NoiseKey resolve_noise_key(const NoiseParams& p) {
  uint64_t seed = p.seed, step = p.step;
  if (p.seed_step != nullptr) {
    seed = static_cast<uint64_t>(p.seed_step[0]);
    step = static_cast<uint64_t>(p.seed_step[1]);
#if DK_DEVICE_CODE && defined(CUDA_KERNEL_ASSERT)
    // the host checks CPU tensors; on the device the value is only known here
    CUDA_KERNEL_ASSERT(step < (uint64_t{1} << 32) && "diffkern: the step in seed_step must lie in [0, 2^32)");
#endif
  }
  return NoiseKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                  static_cast<uint32_t>(step), p.stream};
}

DK_INLINE Uint4 noise_bits(const NoiseKey& key, uint32_t block, uint32_t sample) {
  return philox4x32_10(Uint4{block, sample, key.step, key.stream}, key.key0, key.key1);
}

DK_INLINE Float4 noise_normal4(const NoiseKey& key, uint32_t block, uint32_t sample) {
  return normal4(noise_bits(key, block, sample));
}

DK_NAMESPACE_END
