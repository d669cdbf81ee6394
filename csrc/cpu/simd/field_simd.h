// The Poisson field on the CPU (diffkern/poisson_field.h): a point's kFieldLanes lanes run as vectors,
// each loop below doing for every lane what one CUDA thread does for its lane, in the same order, so
// the result is bitwise that of the per-thread bodies. The charges are read from a [features, count]
// copy, so a lane block of one feature is one contiguous load. Included only by the per-ISA TUs
// (isa_unit.inc), after their target pragma.
#pragma once

#include "../isa_dispatch.h"
#include "diffkern/poisson_field.h"

DK_NAMESPACE_BEGIN
namespace simd {

// FEATURES > 0: compiled for that many features (the loops over them unrolled, the sums in registers).
template <class T, int FEATURES>
void field_points(const FieldArgs& a, const T* charges_t, int64_t begin, int64_t end) {
  constexpr int L = kFieldLanes;
  const int64_t N = FEATURES > 0 ? FEATURES : a.features, M = a.count, full = M / L * L;
  const T inf = static_cast<T>(INFINITY);
  alignas(64) T nearest[L], total[L], d2[L], ratio[L], result[L], base[L], scale[L], weight[L];
  alignas(64) T acc[kFieldMaxFeatures * L];
  for (int64_t n = begin; n < end; ++n) {
    const T* y = static_cast<const T*>(a.points) + n * N;
    const T dz = static_cast<const T*>(a.dz)[n];
    for (int l = 0; l < L; ++l) {
      nearest[l] = inf;
      total[l] = T(0);
    }
    for (int64_t i = 0; i < N * L; ++i) acc[i] = T(0);
    for (int64_t first = 0; first < full; first += L) {
      for (int l = 0; l < L; ++l) d2[l] = dz * dz;
      for (int64_t k = 0; k < N; ++k) {
        const T yk = y[k];
        const T* x = charges_t + k * M + first;
        for (int l = 0; l < L; ++l) {
          const T diff = yk - x[l];
          d2[l] = d2[l] + diff * diff;
        }
      }
      // field_step and field_power, lane-parallel
      for (int l = 0; l < L; ++l) {
        ratio[l] = d2[l] < nearest[l] ? d2[l] / nearest[l] : (nearest[l] == d2[l] ? T(1) : nearest[l] / d2[l]);
        result[l] = T(1);
        base[l] = ratio[l];
      }
      for (int e = a.power; e > 0; e >>= 1) {
        if (e & 1)
          for (int l = 0; l < L; ++l) result[l] = result[l] * base[l];
        for (int l = 0; l < L; ++l) base[l] = base[l] * base[l];
      }
      if (a.half)
        for (int l = 0; l < L; ++l) result[l] = result[l] * static_cast<T>(sqrt(ratio[l]));
      for (int l = 0; l < L; ++l) {
        const bool closer = d2[l] < nearest[l];
        scale[l] = closer ? result[l] : T(1);
        weight[l] = closer ? T(1) : result[l];
        nearest[l] = closer ? d2[l] : nearest[l];
        total[l] = total[l] * scale[l] + weight[l];
      }
      for (int64_t k = 0; k < N; ++k) {
        const T* x = charges_t + k * M + first;
        T* ak = acc + k * L;
        for (int l = 0; l < L; ++l) ak[l] = ak[l] * scale[l] + weight[l] * x[l];
      }
    }
    for (int64_t j = full; j < M; ++j) {  // the last < L charges: one each for lanes 0, 1, ..
      const int64_t l = j - full;
      T dist = dz * dz;
      for (int64_t k = 0; k < N; ++k) {
        const T diff = y[k] - charges_t[k * M + j];
        dist = dist + diff * diff;
      }
      const FieldStep<T> s = field_step(dist, nearest[l], a.power, a.half);
      total[l] = total[l] * s.scale + s.weight;
      for (int64_t k = 0; k < N; ++k) {
        acc[k * L + l] = acc[k * L + l] * s.scale + s.weight * charges_t[k * M + j];
      }
      nearest[l] = s.nearest;
    }
    for (int s = L / 2; s > 0; s /= 2)
      for (int l = 0; l < s; ++l)
        field_merge(nearest[l], total[l], acc + l, nearest[l + s], total[l + s], acc + l + s, N, L, a.power, a.half);
    field_finish(a, n, nearest[0], total[0], acc, L);
  }
}

template <class T>
void field_points_of(const FieldArgs& a, const T* charges_t, int64_t begin, int64_t end) {
  switch (a.features) {  // low-dimensional data (2-d toys, tabular sets) is where the kernel is used most
    case 1: return field_points<T, 1>(a, charges_t, begin, end);
    case 2: return field_points<T, 2>(a, charges_t, begin, end);
    case 3: return field_points<T, 3>(a, charges_t, begin, end);
    case 4: return field_points<T, 4>(a, charges_t, begin, end);
    default: return field_points<T, 0>(a, charges_t, begin, end);
  }
}

template <class V>
void poisson_field_entry(const FieldArgs& a, const void* charges_t, int64_t begin, int64_t end) {
  if (a.dtype == static_cast<int>(c10::ScalarType::Double)) {
    field_points_of<double>(a, static_cast<const double*>(charges_t), begin, end);
  } else {
    field_points_of<float>(a, static_cast<const float*>(charges_t), begin, end);
  }
}

}  // namespace simd
DK_NAMESPACE_END
