// Hutchinson's trace estimator and the likelihood-ODE update, shared by the CPU and CUDA kernels.
//
// For probes v and Jacobian-vector products Jv, both [K, B, features], sample n's estimate is
//     trace_n = scale * sum_k sum_j v[k, n, j] Jv[k, n, j]          (scale = 1 / K: the mean over probes)
// summed in one fixed order on every device, independent of how the work is spread:
//   - the features are cut into chunks of kTraceChunk (the last one shorter);
//   - in a chunk, for each probe, kTraceLanes lanes each add the chunk's features j = lane,
//     lane + kTraceLanes, ... in increasing j, and the lanes are combined by a binary tree (stride
//     kTraceLanes / 2, then half of that, ...); the probes' tree sums are added in increasing k;
//   - the chunks' sums are added in increasing chunk order.
// CUDA gives each (sample, chunk) a block of kTraceLanes threads (so a few large samples still fill
// the GPU) and adds the chunk sums in a second pass; the CPU does the same sums in the same order,
// so the two agree bit for bit. Products and sums are separate roundings (no fma), which the CPU
// baseline vectorises. Accumulation is float32 for half types and float32, float64 for float64.
//
// The likelihood step updates, in the same pass, the probability-flow / CNF state
//     x_next = (c_x x + c_model m) + c_prev m_prev,     delta_next = delta + l0 + l_prev trace_prev + l_trace trace
// (diffkern/likelihood.py derives the coefficients for Euler and Heun steps).
#pragma once

#include "diffkern/macros.h"

namespace diffkern {

// [K, B, features] with contiguous features; probes and products may be strided views.
struct ProbeView {
  const void* data;
  int64_t stride_k, stride_n;
};

struct LikelihoodArgs {
  int dtype;  // c10::ScalarType of x, the model outputs, probes and products
  int64_t batch, features, num_probes;
  ProbeView probes, products;
  const void* x;           // [B, features] contiguous, or null for the trace alone
  const void* m;           // the model output at x (or at the predicted point for a corrector)
  const void* m_prev;      // a corrector's first model output, or null
  const double* delta;     // [B] the accumulated log-density change
  const double* trace_prev;  // [B] or null
  void* x_out;
  double* delta_out;
  double* trace_out;
  double c_x, c_model, c_prev, l0, l_prev, l_trace, trace_scale;
};

}  // namespace diffkern

DK_NAMESPACE_BEGIN

constexpr int kTraceLanes = 128;
constexpr int64_t kTraceChunk = 32 * kTraceLanes;

DK_INLINE int64_t trace_chunks(int64_t features) { return features == 0 ? 1 : (features + kTraceChunk - 1) / kTraceChunk; }

template <class T>
DK_INLINE const T* probe_row(const ProbeView& view, int64_t k, int64_t n) {
  return static_cast<const T*>(view.data) + k * view.stride_k + n * view.stride_n;
}

// One lane's partial sum over features begin + lane, begin + lane + kTraceLanes, ... < end (the
// CUDA thread's share of a chunk).
template <class T, class acc_t>
DK_INLINE acc_t trace_lane(const T* v, const T* jv, int64_t begin, int64_t end, int lane) {
  acc_t acc = acc_t(0);
  for (int64_t j = begin + lane; j < end; j += kTraceLanes) acc = acc + static_cast<acc_t>(v[j]) * static_cast<acc_t>(jv[j]);
  return acc;
}

// One level of the lane tree: partial[lane] += partial[lane + stride] for lane < stride.
template <class acc_t>
DK_INLINE void trace_tree_level(acc_t* partial, int lane, int stride) {
  if (lane < stride) partial[lane] = partial[lane] + partial[lane + stride];
}

template <class T, class acc_t>
DK_INLINE T likelihood_x_element(const LikelihoodArgs& a, int64_t index) {
  acc_t value = static_cast<acc_t>(a.c_x) * static_cast<acc_t>(static_cast<const T*>(a.x)[index]) +
                static_cast<acc_t>(a.c_model) * static_cast<acc_t>(static_cast<const T*>(a.m)[index]);
  if (a.m_prev != nullptr)
    value = value + static_cast<acc_t>(a.c_prev) * static_cast<acc_t>(static_cast<const T*>(a.m_prev)[index]);
  return static_cast<T>(value);
}

// Sample n's trace (from the probe sums in probe order) and log-density update.
DK_INLINE void likelihood_finish(const LikelihoodArgs& a, int64_t n, double probe_sum) {
  const double trace = probe_sum * a.trace_scale;
  a.trace_out[n] = trace;
  if (a.delta_out != nullptr) {
    const double previous = a.trace_prev != nullptr ? a.l_prev * a.trace_prev[n] : 0.0;
    a.delta_out[n] = a.delta[n] + a.l0 + previous + a.l_trace * trace;
  }
}

DK_NAMESPACE_END
