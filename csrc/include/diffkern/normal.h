// The fixed transform from Philox words to standard normals (Box-Muller on pairs of words).
//
// log and sin/cos are our own float32 polynomials (coefficients from tools/fit_transform_polys.py)
// written with explicit fmaf and otherwise plain IEEE operations. Together with the build flags
// (-ffp-contract=off on the host, --fmad=false for nvcc) this makes the scalar CPU path, the AVX2
// CPU path (csrc/cpu/philox_avx2.h mirrors these lines) and the CUDA path bitwise identical,
// instead of "equal up to the last ulp of each libm". Accuracy against float64 Box-Muller of the
// same words is tested in csrc/tests/test_philox.cpp and tests/test_randn.py.
#pragma once

#include <math.h>

#include "diffkern/macros.h"
#include "diffkern/philox.h"

DK_NAMESPACE_BEGIN

struct Float4 {
  float v[4];
};

// Polynomial coefficients in Horner order (highest power first). They are returned by constexpr
// functions rather than stored in arrays because nvcc cannot read namespace-scope host arrays in
// device code; unrolled loops fold each coeff(i) into an immediate on both sides.
//
// log(1 + f) = f + f^2 * L(f) for f in [sqrt(1/2) - 1, sqrt(2) - 1].
struct LogPoly {
  static constexpr int kSize = 9;
  DK_HOST_DEVICE static constexpr float coeff(int i) {
    constexpr float c[kSize] = {-0.07473210990428925f, 0.128195121884346f,  -0.1326199471950531f,
                                0.14196686446666718f,  -0.16608595848083496f, 0.200011745095253f,
                                -0.2500157654285431f,  0.3333333730697632f,   -0.49999988079071045f};
    return c[i];
  }
};
// sin(2 pi f) = f * S(f^2) for f in [-1/8, 1/8] turns.
struct SinPoly {
  static constexpr int kSize = 5;
  DK_HOST_DEVICE static constexpr float coeff(int i) {
    constexpr float c[kSize] = {41.482574462890625f, -76.69820404052734f, 81.60520935058594f,
                                -41.34170150756836f, 6.2831854820251465f};
    return c[i];
  }
};
// cos(2 pi f) = C(f^2) for f in [-1/8, 1/8] turns.
struct CosPoly {
  static constexpr int kSize = 5;
  DK_HOST_DEVICE static constexpr float coeff(int i) {
    constexpr float c[kSize] = {59.225040435791016f, -85.44305419921875f, 64.93931579589844f,
                                -19.739208221435547f, 1.0f};
    return c[i];
  }
};
// ln 2 split so that e * kLn2Hi is exact for |e| < 2^8.
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187e-06f;

template <typename Poly>
DK_INLINE float horner(float x) {
  float p = Poly::coeff(0);
#if DK_DEVICE_CODE
#pragma unroll
#endif
  for (int i = 1; i < Poly::kSize; ++i) p = fmaf(p, x, Poly::coeff(i));
  return p;
}

// A uniform in (0, 1] from 31 bits of a word: the smallest value is 2^-32, so the largest Box-Muller
// radius is sqrt(64 ln 2) = 6.66 (as with curand's 32-bit uniforms), and log never sees 0.
DK_INLINE float uniform_open_closed(uint32_t word) {
  return fmaf(static_cast<float>(static_cast<int32_t>(word >> 1)), 0x1p-31f, 0x1p-32f);
}

// Natural log of u in [2^-32, 1]: u = 2^e * m with m in [sqrt(1/2), sqrt(2)).
DK_INLINE float log_unit(float u) {
  const uint32_t ix = bits_of(u);
  const int32_t e = static_cast<int32_t>(ix - 0x3f3504f3u) >> 23;  // 0x3f3504f3 = bits of sqrt(1/2)
  const float f = float_of(ix - (static_cast<uint32_t>(e) << 23)) - 1.0f;
  const float log_m = fmaf(f * f, horner<LogPoly>(f), f);
  const float fe = static_cast<float>(e);
  return fmaf(fe, kLn2Hi, fmaf(fe, kLn2Lo, log_m));
}

// sin and cos of the angle 2 pi word / 2^32: reduce to the nearest quarter turn with integer math
// (exact), evaluate on [-1/8, 1/8] turns, then rotate by the quadrant.
DK_INLINE void sincos_turns(uint32_t word, float& sin_out, float& cos_out) {
  const uint32_t quadrant = (word + 0x20000000u) >> 30;
  const int32_t rest = static_cast<int32_t>(word - (quadrant << 30));  // in [-2^29, 2^29)
  const float f = static_cast<float>(rest) * 0x1p-32f;
  const float f2 = f * f;
  const float s = f * horner<SinPoly>(f2);
  const float c = horner<CosPoly>(f2);
  // quadrant q adds q quarter turns: (sin, cos) -> (cos, -sin) per quarter.
  const bool swap = quadrant & 1u;
  const float sin_abs = swap ? c : s, cos_abs = swap ? s : c;
  sin_out = (quadrant & 2u) ? -sin_abs : sin_abs;
  cos_out = ((quadrant + 1u) & 2u) ? -cos_abs : cos_abs;
}

// Box-Muller: radius from the first word, angle from the second.
DK_INLINE void box_muller(uint32_t radius_word, uint32_t angle_word, float& z0, float& z1) {
  const float radius = sqrtf(-2.0f * log_unit(uniform_open_closed(radius_word)));
  float s, c;
  sincos_turns(angle_word, s, c);
  z0 = radius * c;
  z1 = radius * s;
}

// Four standard normals from one Philox block: words (x, y) give normals 0, 1 and (z, w) give 2, 3.
DK_INLINE Float4 normal4(Uint4 bits) {
  Float4 out;
  box_muller(bits.x, bits.y, out.v[0], out.v[1]);
  box_muller(bits.z, bits.w, out.v[2], out.v[3]);
  return out;
}

DK_NAMESPACE_END
