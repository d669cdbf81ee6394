// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// counter-based generator behind every random number in diffkern.
//
// It is a pure function of a 128-bit counter and a 64-bit key, so any thread on any device can
// compute the numbers for its own (seed, stream, step, sample, feature) without generator state.
// Checked against the Random123 known-answer vectors in csrc/tests and tests/test_philox.py.
#pragma once

#include "diffkern/macros.h"

DK_NAMESPACE_BEGIN

struct Uint4 {
  uint32_t x, y, z, w;
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bump, golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // key bump, sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

DK_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if DK_DEVICE_CODE
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DK_INLINE Uint4 philox_round(Uint4 c, uint32_t k0, uint32_t k1) {
  const uint32_t hi0 = mulhi32(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
  const uint32_t hi1 = mulhi32(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
  return Uint4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
}

// Ten rounds; the key is bumped between rounds (nine bumps), as in Random123.
DK_INLINE Uint4 philox4x32_10(Uint4 counter, uint32_t k0, uint32_t k1) {
#if DK_DEVICE_CODE
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    counter = philox_round(counter, k0, k1);
  }
  return counter;
}

DK_NAMESPACE_END
