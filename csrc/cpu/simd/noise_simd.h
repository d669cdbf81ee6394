// The noise stream on SIMD registers, written once for any vector trait V (VecAvx2, VecAvx512).
//
// Each function mirrors, operation for operation, its scalar twin in diffkern/philox.h and
// diffkern/normal.h (same constants, same fma placement, same IEEE rounding), so every ISA is
// bitwise identical to the scalar path and to CUDA (tests/test_randn.py checks all of them).
// Included only by the per-ISA TUs (isa_*.cpp), after their target pragma.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <type_traits>

#include "../isa_dispatch.h"
#include "diffkern/noise.h"
#include "diffkern/noise_fill.h"

DK_NAMESPACE_BEGIN
namespace simd {

template <class V>
struct Words {
  typename V::I x, y, z, w;
};

template <class V>
Words<V> philox(Words<V> c, uint32_t k0, uint32_t k1) {
  using I = typename V::I;
  const I m0 = V::splat(kPhiloxM0), m1 = V::splat(kPhiloxM1);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    I hi0, lo0, hi1, lo1;
    V::mulhilo(m0, c.x, hi0, lo0);
    V::mulhilo(m1, c.z, hi1, lo1);
    c = Words<V>{V::bit_xor(V::bit_xor(hi1, c.y), V::splat(k0)), lo1,
                 V::bit_xor(V::bit_xor(hi0, c.w), V::splat(k1)), lo0};
  }
  return c;
}

template <class V>
Words<V> noise_bits(const NoiseKey& key, typename V::I block, typename V::I sample) {
  return philox<V>(Words<V>{block, sample, V::splat(key.step), V::splat(key.stream)}, key.key0, key.key1);
}

template <class V, class Poly>
typename V::F horner(typename V::F x) {
  typename V::F p = V::splat(Poly::coeff(0));
  for (int i = 1; i < Poly::kSize; ++i) p = V::fma(p, x, V::splat(Poly::coeff(i)));
  return p;
}

// log_unit(uniform_open_closed(word)) of normal.h.
template <class V>
typename V::F log_uniform(typename V::I word) {
  using F = typename V::F;
  using I = typename V::I;
  const F u = V::fma(V::to_float(V::template shift_right<1>(word)), V::splat(0x1p-31f), V::splat(0x1p-32f));
  const I ix = V::bits(u);
  const I e = V::template shift_right_arith<23>(V::sub(ix, V::splat(0x3f3504f3u)));
  const F f = V::sub(V::from_bits(V::sub(ix, V::template shift_left<23>(e))), V::splat(1.0f));
  const F log_m = V::fma(V::mul(f, f), horner<V, LogPoly>(f), f);
  const F fe = V::to_float(e);
  return V::fma(fe, V::splat(kLn2Hi), V::fma(fe, V::splat(kLn2Lo), log_m));
}

// sincos_turns of normal.h; the sign flips are xors of the sign bit, exactly as the scalar `-x`.
template <class V>
void sincos_turns(typename V::I word, typename V::F& sin_out, typename V::F& cos_out) {
  using F = typename V::F;
  using I = typename V::I;
  const I quadrant = V::template shift_right<30>(V::add(word, V::splat(0x20000000u)));
  const I rest = V::sub(word, V::template shift_left<30>(quadrant));
  const F f = V::mul(V::to_float(rest), V::splat(0x1p-32f));
  const F f2 = V::mul(f, f);
  const F s = V::mul(f, horner<V, SinPoly>(f2));
  const F c = horner<V, CosPoly>(f2);
  const F sin_abs = V::select_odd(quadrant, c, s), cos_abs = V::select_odd(quadrant, s, c);
  const I two = V::splat(2u);
  const I sin_sign = V::template shift_left<30>(V::bit_and(quadrant, two));
  const I cos_sign = V::template shift_left<30>(V::bit_and(V::add(quadrant, V::splat(1u)), two));
  sin_out = V::from_bits(V::bit_xor(V::bits(sin_abs), sin_sign));
  cos_out = V::from_bits(V::bit_xor(V::bits(cos_abs), cos_sign));
}

template <class V>
void box_muller(typename V::I radius_word, typename V::I angle_word, typename V::F& z0, typename V::F& z1) {
  using F = typename V::F;
  const F radius = V::sqrt(V::mul(V::splat(-2.0f), log_uniform<V>(radius_word)));
  F s, c;
  sincos_turns<V>(angle_word, s, c);
  z0 = V::mul(radius, c);
  z1 = V::mul(radius, s);
}

// What a fill draws from the words of W Philox blocks: out[e] holds element e of every lane's
// block, for the first `count` elements (the scalar twins are NormalGenerator and
// RademacherGenerator in diffkern/noise_fill.h).
struct NormalDraw {  // Box-Muller on word pairs (x, y) and (z, w), as normal4
  template <class V>
  static void values(const Words<V>& bits, int count, typename V::F out[4]) {
    box_muller<V>(bits.x, bits.y, out[0], out[1]);
    if (count > 2) box_muller<V>(bits.z, bits.w, out[2], out[3]);
  }
};

struct RademacherDraw {  // the sign bit of each word: -1 or +1
  template <class V>
  static void values(const Words<V>& bits, int, typename V::F out[4]) {
    const typename V::I sign = V::splat(0x80000000u), one = V::bits(V::splat(1.0f));
    const typename V::I words[4] = {bits.x, bits.y, bits.z, bits.w};
    for (int e = 0; e < 4; ++e) out[e] = V::from_bits(V::bit_xor(one, V::bit_and(words[e], sign)));
  }
};

struct BitsDraw {  // the words themselves, as float bit patterns (only ever moved, never computed on)
  template <class V>
  static void values(const Words<V>& bits, int, typename V::F out[4]) {
    const typename V::I words[4] = {bits.x, bits.y, bits.z, bits.w};
    for (int e = 0; e < 4; ++e) out[e] = V::from_bits(words[e]);
  }
};

// The 4 W values of W blocks, lane after lane: dst[4 l + e] is element e of lane l's block.
template <class V, class Draw>
void draw_blocks(const NoiseKey& key, typename V::I block, typename V::I sample, float* dst) {
  typename V::F z[4];
  Draw::template values<V>(noise_bits<V>(key, block, sample), 4, z);
  V::store_interleaved4(dst, z[0], z[1], z[2], z[3]);
}


// S -> T; float -> half goes through the hardware conversion (bitwise equal to c10::Half's).
template <class V, class T, class S>
void store_converted(T* dst, const S* values, int64_t count) {
  int64_t k = 0;
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<S, float>) {
    for (; k + V::kWidth <= count; k += V::kWidth) V::store_half(dst + k, values + k);
  }
  for (; k < count; ++k) dst[k] = static_cast<T>(values[k]);
}

// Rows of 1 to 3 features hold one block each, of which they use the first features: W
// consecutive samples per vector (for normals, the second Box-Muller pair only with 3 features).
// out points at element out_offset of the [rows, row_size] output. Returns the first row not
// written (the caller finishes the last < W rows).
template <class V, class Draw, class T>
int64_t fill_short_rows(T* out, int64_t out_offset, const FillShape& shape, const NoiseKey& key,
                        uint64_t sample_offset, int64_t begin, int64_t end) {
  constexpr int W = V::kWidth;
  const int features = static_cast<int>(shape.row_size);
  alignas(64) float values[3 * W];
  alignas(64) float by_element[3][W];
  int64_t row = begin;
  for (; row + W <= end; row += W) {
    typename V::F z[4];
    Draw::template values<V>(noise_bits<V>(key, V::splat(0u),
                                           V::add(V::splat(static_cast<uint32_t>(row + sample_offset)), V::iota())),
                             features, z);
    T* dst = out + (row * features - out_offset);
    float* target = std::is_same_v<T, float> ? reinterpret_cast<float*>(dst) : values;
    if (features == 1) {
      V::store(target, z[0]);
    } else if (features == 2) {
      V::store_interleaved2(target, z[0], z[1]);
    } else {
      for (int e = 0; e < 3; ++e) V::store(by_element[e], z[e]);
      for (int l = 0; l < W; ++l)
        for (int e = 0; e < 3; ++e) target[3 * l + e] = by_element[e][l];
    }
    if constexpr (!std::is_same_v<T, float>) store_converted<V>(dst, values, W * features);
  }
  return row;
}

// Blocks [begin, end) of the (row, block) index space of noise_fill.h, W blocks at a time, written
// to out, which points at element out_offset of the contiguous [rows, row_size] output (a caller
// that wants a slice passes a buffer and the slice's first element).
template <class V, class Draw, class T>
void fill(T* out, int64_t out_offset, const FillShape& shape, const NoiseKey& key, uint64_t sample_offset,
          int64_t begin, int64_t end) {
  constexpr int W = V::kWidth;
  if (shape.row_size < 4) begin = fill_short_rows<V, Draw>(out, out_offset, shape, key, sample_offset, begin, end);
  const int64_t full_blocks = shape.row_size / 4;  // blocks holding 4 features
  // Rows of a multiple of 4 features: block t of the index space holds elements 4t .. 4t + 3, so
  // any W consecutive blocks are 4 W consecutive elements, whichever rows they belong to.
  const bool dense = shape.row_size % 4 == 0;
  alignas(64) float values[4 * W];
  int64_t row, block;
  split_thread_index(begin, shape.blocks_per_row, row, block);
  for (int64_t t = begin; t < end;) {
    T* dst = out + (row * shape.row_size + 4 * block - out_offset);
    if (t + W <= end && (block + W <= full_blocks || dense)) {
      float* target = std::is_same_v<T, float> ? reinterpret_cast<float*>(dst) : values;
      if (block + W <= full_blocks) {  // W blocks of one row
        draw_blocks<V, Draw>(key, V::add(V::splat(static_cast<uint32_t>(block)), V::iota()),
                             V::splat(static_cast<uint32_t>(row + sample_offset)), target);
        block += W;
      } else {  // W blocks across rows
        alignas(64) int32_t lane_block[W], lane_sample[W];
        for (int l = 0; l < W; ++l) {
          lane_block[l] = static_cast<int32_t>(block);
          lane_sample[l] = static_cast<int32_t>(row + sample_offset);
          if (++block == shape.blocks_per_row) {
            block = 0;
            ++row;
          }
        }
        draw_blocks<V, Draw>(key, V::load(lane_block), V::load(lane_sample), target);
      }
      if constexpr (!std::is_same_v<T, float>) store_converted<V>(dst, values, 4 * W);
      t += W;
      if (block == shape.blocks_per_row) {
        block = 0;
        ++row;
      }
      continue;
    }
    // Anything else (row tails of other sizes, the last < W blocks): up to W consecutive blocks.
    const int lanes = static_cast<int>(std::min<int64_t>(W, end - t));
    alignas(64) int32_t lane_block[W] = {0}, lane_sample[W] = {0};
    int64_t lane_offset[W], lane_count[W];
    for (int l = 0; l < lanes; ++l) {
      lane_block[l] = static_cast<int32_t>(block);
      lane_sample[l] = static_cast<int32_t>(row + sample_offset);
      lane_offset[l] = row * shape.row_size + 4 * block - out_offset;
      lane_count[l] = std::min<int64_t>(4, shape.row_size - 4 * block);
      if (++block == shape.blocks_per_row) {
        block = 0;
        ++row;
      }
    }
    draw_blocks<V, Draw>(key, V::load(lane_block), V::load(lane_sample), values);
    for (int l = 0; l < lanes; ++l) store_converted<V>(out + lane_offset[l], values + 4 * l, lane_count[l]);
    t += lanes;
  }
}

template <class V, class Draw>
void fill_entry(const cpu::NoiseFillArgs& a) {
  const FillShape shape{a.rows, a.row_size, (a.row_size + 3) / 4};
  const NoiseKey key{a.key0, a.key1, a.step, a.stream};
  switch (a.dtype) {
    case c10::ScalarType::Float:
      return fill<V, Draw>(static_cast<float*>(a.out), 0, shape, key, a.sample_offset, a.begin, a.end);
    case c10::ScalarType::Double:
      return fill<V, Draw>(static_cast<double*>(a.out), 0, shape, key, a.sample_offset, a.begin, a.end);
    case c10::ScalarType::Half:
      return fill<V, Draw>(static_cast<c10::Half*>(a.out), 0, shape, key, a.sample_offset, a.begin, a.end);
    case c10::ScalarType::BFloat16:
      return fill<V, Draw>(static_cast<c10::BFloat16*>(a.out), 0, shape, key, a.sample_offset, a.begin, a.end);
    default:
      TORCH_CHECK(false, "diffkern: unsupported dtype for the noise fill: ", a.dtype);
  }
}

template <class V>
void fill_noise_entry(const cpu::NoiseFillArgs& a) {
  if (a.distribution == cpu::Distribution::kRademacher) return fill_entry<V, RademacherDraw>(a);
  if (a.distribution == cpu::Distribution::kBits) return fill_entry<V, BitsDraw>(a);
  return fill_entry<V, NormalDraw>(a);
}

}  // namespace simd
DK_NAMESPACE_END
