// AVX2 + FMA + F16C vector trait for the generic SIMD kernels (noise_simd.h): 8 lanes. Included only by
// isa_avx2.cpp, after its target pragma.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace diffkern {
inline namespace DK_ISA {

struct VecAvx2 {
  static constexpr int kWidth = 8;
  using F = __m256;
  using I = __m256i;

  static I splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static F splat(float x) { return _mm256_set1_ps(x); }
  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }

  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I bit_xor(I a, I b) { return _mm256_xor_si256(a, b); }
  static I bit_and(I a, I b) { return _mm256_and_si256(a, b); }
  template <int n> static I shift_right(I a) { return _mm256_srli_epi32(a, n); }
  template <int n> static I shift_right_arith(I a) { return _mm256_srai_epi32(a, n); }
  template <int n> static I shift_left(I a) { return _mm256_slli_epi32(a, n); }

  // High and low words of the 32x32 -> 64-bit products m * c. Only even lanes have a multiply
  // (vpmuludq), so odd lanes go through a 32-bit shift.
  static void mulhilo(I m, I c, I& hi, I& lo) {
    const I even = _mm256_mul_epu32(m, c);
    const I odd = _mm256_mul_epu32(m, _mm256_srli_epi64(c, 32));
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }

  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }  // signed int32 -> float, rounded
  static I bits(F a) { return _mm256_castps_si256(a); }
  static F from_bits(I a) { return _mm256_castsi256_ps(a); }
  // Per lane: bit 0 of q set ? if_odd : if_even.
  static F select_odd(I q, F if_odd, F if_even) {
    const I one = _mm256_set1_epi32(1);
    return _mm256_blendv_ps(if_even, if_odd, _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(q, one), one)));
  }

  // dst[4 l + e] = z_e[l]: four values per lane, lane after lane (a 4 x 8 transpose).
  static void store_interleaved4(float* dst, F z0, F z1, F z2, F z3) {
    const F t0 = _mm256_unpacklo_ps(z0, z1), t1 = _mm256_unpackhi_ps(z0, z1);
    const F t2 = _mm256_unpacklo_ps(z2, z3), t3 = _mm256_unpackhi_ps(z2, z3);
    // b_i holds lanes i and 4 + i in its 128-bit halves.
    const F b0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const F b1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const F b2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const F b3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(b0, b1, 0x20));
    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(b2, b3, 0x20));
    _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(b0, b1, 0x31));
    _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(b2, b3, 0x31));
  }

  // 8 floats to IEEE half, round to nearest even (as c10::Half's conversion).
  static void store_half(void* dst, const float* src) {
    _mm_storeu_si128(static_cast<__m128i*>(dst),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  // dst[2 l + e] = z_e[l].
  static void store_interleaved2(float* dst, F z0, F z1) {
    const F lo = _mm256_unpacklo_ps(z0, z1), hi = _mm256_unpackhi_ps(z0, z1);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
};

}  // namespace DK_ISA
}  // namespace diffkern
