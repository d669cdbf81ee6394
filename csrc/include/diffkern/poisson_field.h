// The empirical Poisson field of PFGM (eq. 98: E(y~) = sum_j (y~ - x~_j) / |y~ - x~_j|^(N+1)) of M charges
// x_j on the plane z = 0 at points y~ = (y, dz) above it, in the form the sampler and the training loss
// read: the charges' weighted mean xbar = sum_j w_j x_j / sum_j w_j with w_j = d_j^-(N+1), d_j^2 =
// |y - x_j|^2 + dz^2, and log sum_j w_j. Then E = (sum_j w_j) (y - xbar, dz).
//
// The weights over- and underflow in any dimension worth having, so each accumulator keeps them
// relative to the smallest d^2 seen so far, m: w_j / m^-(N+1)/2 = (m / d_j^2)^p, p = (N+1)/2, a power of
// a ratio in (0, 1] taken by repeated squaring (and one square root for half-integer p): no exp or
// log per pair, and a charge whose weight is below the accumulator's smallest normal number
// relative to the nearest one contributes exactly 0 (it would add less than one rounding). A
// closer charge rescales what was accumulated by (d^2 / m)^p, as flash attention rescales its
// softmax by a new maximum.
//
// Order, the same on every device: charge j goes to lane j mod kFieldLanes; a lane takes its
// charges in increasing j; per pair, d^2 = dz^2 + (y_0 - x_0)^2 + (y_1 - x_1)^2 + ... in feature order;
// the lanes are merged by a binary tree (lane l takes lane l + s for s = kFieldLanes / 2, .., 1).
// CUDA gives a point kFieldLanes threads (one per lane); the CPU runs the lanes as vectors. No
// operation is contracted into an FMA (--fmad=false, -ffp-contract=off), so the two agree bit for
// bit on the mean; log sum w uses the device's log.
#pragma once

#include <cmath>
#include <cstdint>

#include "diffkern/macros.h"

// The arguments are shared by every ISA's code and CUDA: outside the versioned namespace (macros.h),
// as step_args.h.
namespace diffkern {

constexpr int kFieldLanes = 16;
// The direct kernel keeps a lane's weighted sum of charges in registers: up to this many features.
// Larger N goes through matrix products (diffkern.models.EmpiricalPoissonField).
constexpr int kFieldMaxFeatures = 64;

struct FieldArgs {
  const void* points;   // [batch, features]
  const void* dz;       // [batch], > 0
  const void* charges;  // [charges, features] (the CPU path reads a [features, charges] copy)
  void* mean;           // [batch, features], out
  double* log_total;    // [batch], out
  int64_t batch, count, features;
  int dtype;      // at::ScalarType of all tensors: float or double
  int power;      // floor((N + 1) / 2)
  bool half;      // (N + 1) odd: p has a half
};

}  // namespace diffkern

DK_NAMESPACE_BEGIN

// r^p for r in [0, 1], p = power (+ 1/2 if half): squaring, then one square root.
template <class T>
DK_INLINE T field_power(T r, int power, bool half) {
  T result = T(1), base = r;
  for (int e = power; e > 0; e >>= 1) {
    if (e & 1) result = result * base;
    base = base * base;
  }
  if (half) result = result * static_cast<T>(sqrt(r));
  return result;
}

// One lane's accumulator after a charge at squared distance d2: the scale of what it held, the
// charge's weight, and its new nearest squared distance (m = +inf before the first charge).
template <class T>
struct FieldStep {
  T scale, weight, nearest;
};

template <class T>
DK_INLINE FieldStep<T> field_step(T d2, T nearest, int power, bool half) {
  const bool closer = d2 < nearest;
  // the ratio of the smaller to the larger; equal (both 0 on a charge) is 1, not 0 / 0
  const T q = field_power(closer ? d2 / nearest : (nearest == d2 ? T(1) : nearest / d2), power, half);
  return FieldStep<T>{closer ? q : T(1), closer ? T(1) : q, closer ? d2 : nearest};
}

// Lane b merged into lane a: the nearer reference, each side rescaled to it (an empty lane, whose
// nearest is +inf, contributes 0).
template <class T>
DK_INLINE void field_merge(T& nearest_a, T& total_a, T* acc_a, T nearest_b, T total_b, const T* acc_b,
                           int64_t features, int64_t stride, int power, bool half) {
  const T nearest = nearest_b < nearest_a ? nearest_b : nearest_a;
  const T inf = static_cast<T>(INFINITY);
  const T ra = nearest_a == inf ? T(0) : nearest_a == nearest ? T(1) : field_power(nearest / nearest_a, power, half);
  const T rb = nearest_b == inf ? T(0) : nearest_b == nearest ? T(1) : field_power(nearest / nearest_b, power, half);
  total_a = total_a * ra + total_b * rb;
  for (int64_t k = 0; k < features; ++k) acc_a[k * stride] = acc_a[k * stride] * ra + acc_b[k * stride] * rb;
  nearest_a = nearest;
}

// The per-thread body of one lane: its charges lane, lane + kFieldLanes, .. of [first, end), taking
// charge features at charges[j * features + k], into (nearest, total, acc[k * stride]).
template <class T>
DK_INLINE void field_lane(const FieldArgs& a, const T* y, T dz, int64_t lane, int64_t first, int64_t end,
                          T& nearest, T& total, T* acc, int64_t stride) {
  const T* charges = static_cast<const T*>(a.charges);
  for (int64_t j = first + lane; j < end; j += kFieldLanes) {
    const T* x = charges + j * a.features;
    T d2 = dz * dz;
    for (int64_t k = 0; k < a.features; ++k) {
      const T diff = y[k] - x[k];
      d2 = d2 + diff * diff;
    }
    const FieldStep<T> s = field_step(d2, nearest, a.power, a.half);
    total = total * s.scale + s.weight;
    for (int64_t k = 0; k < a.features; ++k) acc[k * stride] = acc[k * stride] * s.scale + s.weight * x[k];
    nearest = s.nearest;
  }
}

// The point's outputs from its merged lane 0.
template <class T>
DK_INLINE void field_finish(const FieldArgs& a, int64_t n, T nearest, T total, const T* acc, int64_t stride) {
  T* mean = static_cast<T*>(a.mean) + n * a.features;
  for (int64_t k = 0; k < a.features; ++k) mean[k] = acc[k * stride] / total;
  const double p = static_cast<double>(a.power) + (a.half ? 0.5 : 0.0);
  a.log_total[n] = log(static_cast<double>(total)) - p * log(static_cast<double>(nearest));
}

DK_NAMESPACE_END
