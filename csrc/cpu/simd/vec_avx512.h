// AVX-512F vector trait for the generic SIMD kernels (noise_simd.h): 16 lanes. Included only by
// isa_avx512.cpp, after its target pragma.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace diffkern {
inline namespace DK_ISA {

struct VecAvx512 {
  static constexpr int kWidth = 16;
  using F = __m512;
  using I = __m512i;

  static I splat(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static F splat(float x) { return _mm512_set1_ps(x); }
  static I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }

  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I bit_xor(I a, I b) { return _mm512_xor_si512(a, b); }
  static I bit_and(I a, I b) { return _mm512_and_si512(a, b); }
  template <int n> static I shift_right(I a) { return _mm512_srli_epi32(a, n); }
  template <int n> static I shift_right_arith(I a) { return _mm512_srai_epi32(a, n); }
  template <int n> static I shift_left(I a) { return _mm512_slli_epi32(a, n); }

  // As VecAvx2::mulhilo: even lanes multiply directly, odd lanes after a 32-bit shift.
  static void mulhilo(I m, I c, I& hi, I& lo) {
    const I even = _mm512_mul_epu32(m, c);
    const I odd = _mm512_mul_epu32(m, _mm512_srli_epi64(c, 32));
    constexpr __mmask16 kOddLanes = 0xAAAA;
    hi = _mm512_mask_blend_epi32(kOddLanes, _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mask_blend_epi32(kOddLanes, even, _mm512_slli_epi64(odd, 32));
  }

  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static I bits(F a) { return _mm512_castps_si512(a); }
  static F from_bits(I a) { return _mm512_castsi512_ps(a); }
  static F select_odd(I q, F if_odd, F if_even) {
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(q, _mm512_set1_epi32(1)), if_even, if_odd);
  }

  // dst[4 l + e] = z_e[l] (a 4 x 16 transpose: 4 x 4 within 128-bit lanes, then across them).
  static void store_interleaved4(float* dst, F z0, F z1, F z2, F z3) {
    const F t0 = _mm512_unpacklo_ps(z0, z1), t1 = _mm512_unpackhi_ps(z0, z1);
    const F t2 = _mm512_unpacklo_ps(z2, z3), t3 = _mm512_unpackhi_ps(z2, z3);
    // b_i holds lanes i, 4 + i, 8 + i, 12 + i in its four 128-bit parts.
    const F b0 = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const F b1 = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const F b2 = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const F b3 = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    const F u0 = _mm512_shuffle_f32x4(b0, b1, _MM_SHUFFLE(1, 0, 1, 0));
    const F u1 = _mm512_shuffle_f32x4(b2, b3, _MM_SHUFFLE(1, 0, 1, 0));
    const F u2 = _mm512_shuffle_f32x4(b0, b1, _MM_SHUFFLE(3, 2, 3, 2));
    const F u3 = _mm512_shuffle_f32x4(b2, b3, _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_ps(dst, _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + 16, _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(dst + 32, _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(dst + 48, _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 1, 3, 1)));
  }

  // 16 floats to IEEE half, round to nearest even (as c10::Half's conversion).
  static void store_half(void* dst, const float* src) {
    _mm256_storeu_si256(static_cast<__m256i*>(dst),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  // dst[2 l + e] = z_e[l].
  static void store_interleaved2(float* dst, F z0, F z1) {
    const F lo = _mm512_unpacklo_ps(z0, z1), hi = _mm512_unpackhi_ps(z0, z1);
    // Output chunk c (128 bits) is lanes 2c and 2c + 1 interleaved; lo holds chunks 0, 2, 4, 6 and
    // hi chunks 1, 3, 5, 7.
    const F first = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));   // chunks 0 2 1 3
    const F second = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));  // chunks 4 6 5 7
    _mm512_storeu_ps(dst, _mm512_shuffle_f32x4(first, first, _MM_SHUFFLE(3, 1, 2, 0)));
    _mm512_storeu_ps(dst + 16, _mm512_shuffle_f32x4(second, second, _MM_SHUFFLE(3, 1, 2, 0)));
  }
};

}  // namespace DK_ISA
}  // namespace diffkern
