// CPU kernels of the Hutchinson trace and the likelihood step (diffkern/trace_math.h): the sums
// of a CUDA block, in the same order, one sample per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../likelihood_common.h"
#include "diffkern/trace_math.h"

namespace diffkern {
namespace cpu {
namespace {

template <class T, class acc_t>
void likelihood_rows(const LikelihoodArgs& a, int64_t begin, int64_t end) {
  alignas(64) acc_t partial[kTraceLanes];
  for (int64_t n = begin; n < end; ++n) {
    acc_t probe_sum = acc_t(0);
    for (int64_t k = 0; k < a.num_probes; ++k) {
      const T* v = probe_row<T>(a.probes, k, n);
      const T* jv = probe_row<T>(a.products, k, n);
      // lane l adds features l, l + kTraceLanes, ... in increasing order (as trace_lane), vectorised
      for (int lane = 0; lane < kTraceLanes; ++lane) partial[lane] = acc_t(0);
      for (int64_t first = 0; first < a.features; first += kTraceLanes) {
        const int lanes = static_cast<int>(std::min<int64_t>(kTraceLanes, a.features - first));
        for (int lane = 0; lane < lanes; ++lane)
          partial[lane] = partial[lane] + static_cast<acc_t>(v[first + lane]) * static_cast<acc_t>(jv[first + lane]);
      }
      for (int stride = kTraceLanes / 2; stride > 0; stride /= 2)
        for (int lane = 0; lane < stride; ++lane) trace_tree_level(partial, lane, stride);
      probe_sum = probe_sum + partial[0];
    }
    likelihood_finish(a, n, static_cast<double>(probe_sum));
    if (a.x != nullptr) {
      T* x_out = static_cast<T*>(a.x_out);
      for (int64_t j = 0; j < a.features; ++j) x_out[n * a.features + j] = likelihood_x_element<T, acc_t>(a, n * a.features + j);
    }
  }
}

void run(const LikelihoodArgs& a) {
  const int64_t work_per_sample = std::max<int64_t>(1, a.features * (a.num_probes + 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                  "diffkern::likelihood_step", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, a.batch, std::max<int64_t>(1, 32768 / work_per_sample), [&](int64_t begin, int64_t end) {
      likelihood_rows<scalar_t, acc_t>(a, begin, end);
    });
  });
}

at::Tensor probe_trace_cpu(const at::Tensor& probes, const at::Tensor& products, double scale) {
  LikelihoodCall call = prepare_probe_trace(probes, products, scale);
  run(call.args);
  return call.trace;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> likelihood_step_cpu(DK_LIKELIHOOD_STEP_PARAMS) {
  LikelihoodCall call = prepare_likelihood_step(DK_LIKELIHOOD_STEP_ARGS);
  run(call.args);
  return {call.x_next, call.delta_next, call.trace};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("probe_trace", &probe_trace_cpu);
  m.impl("likelihood_step", &likelihood_step_cpu);
}

}  // namespace cpu
}  // namespace diffkern
