// CPU kernels of the Hutchinson trace and the likelihood step (diffkern/trace_math.h): the sums
// of the CUDA blocks, chunk by chunk in the same order, whole samples per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../likelihood_common.h"
#include "diffkern/trace_math.h"

namespace diffkern {
namespace cpu {
namespace {

// The tree sum of one probe over features [begin, end) of a chunk, as kTraceLanes CUDA threads
// compute it. A chunk of fewer than kTraceLanes features leaves the upper lanes at 0, so the tree
// runs over the smallest power of two that holds the used lanes: the levels above only add zeros.
template <class T, class acc_t>
acc_t chunk_tree_sum(const T* v, const T* jv, int64_t begin, int64_t end, acc_t* partial) {
  int used = kTraceLanes;
  if (end - begin < kTraceLanes) {
    used = 1;
    while (used < end - begin) used *= 2;
  }
  for (int lane = 0; lane < used; ++lane) partial[lane] = acc_t(0);
  // lane l adds features begin + l, begin + l + kTraceLanes, ... in increasing order (as trace_lane), vectorised
  for (int64_t first = begin; first < end; first += kTraceLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kTraceLanes, end - first));
    for (int lane = 0; lane < lanes; ++lane)
      partial[lane] = partial[lane] + static_cast<acc_t>(v[first + lane]) * static_cast<acc_t>(jv[first + lane]);
  }
  for (int stride = used / 2; stride > 0; stride /= 2)
    for (int lane = 0; lane < stride; ++lane) trace_tree_level(partial, lane, stride);
  return partial[0];
}

// Samples of at most kTraceLanes features, kGroup at a time: the same sums as chunk_tree_sum, with
// lane l of every sample in one row of `lanes`, so each tree level is one loop across samples.
constexpr int64_t kGroup = 64;

template <class T, class acc_t>
void small_sample_traces(const LikelihoodArgs& a, int64_t begin, int64_t end) {
  int used = 1;
  while (used < a.features) used *= 2;
  alignas(64) acc_t lanes[kTraceLanes][kGroup];
  alignas(64) acc_t chunk_sum[kGroup];
  for (int64_t n0 = begin; n0 < end; n0 += kGroup) {
    const int64_t group = std::min(kGroup, end - n0);
    for (int64_t s = 0; s < group; ++s) chunk_sum[s] = acc_t(0);
    for (int64_t k = 0; k < a.num_probes; ++k) {
      for (int lane = 0; lane < used; ++lane) {
        if (lane >= a.features) {
          for (int64_t s = 0; s < group; ++s) lanes[lane][s] = acc_t(0);
          continue;
        }
        for (int64_t s = 0; s < group; ++s)
          lanes[lane][s] = static_cast<acc_t>(probe_row<T>(a.probes, k, n0 + s)[lane]) *
                           static_cast<acc_t>(probe_row<T>(a.products, k, n0 + s)[lane]);
      }
      for (int stride = used / 2; stride > 0; stride /= 2)
        for (int lane = 0; lane < stride; ++lane)
          for (int64_t s = 0; s < group; ++s) lanes[lane][s] = lanes[lane][s] + lanes[lane + stride][s];
      for (int64_t s = 0; s < group; ++s) chunk_sum[s] = chunk_sum[s] + lanes[0][s];
    }
    for (int64_t s = 0; s < group; ++s) likelihood_finish(a, n0 + s, static_cast<double>(acc_t(0) + chunk_sum[s]));
  }
}

template <class T, class acc_t>
void likelihood_rows(const LikelihoodArgs& a, int64_t begin, int64_t end) {
  if (a.features > 0 && a.features <= kTraceLanes) {
    small_sample_traces<T, acc_t>(a, begin, end);
    if (a.x != nullptr) {
      T* x_out = static_cast<T*>(a.x_out);
      for (int64_t i = begin * a.features; i < end * a.features; ++i) x_out[i] = likelihood_x_element<T, acc_t>(a, i);
    }
    return;
  }
  alignas(64) acc_t partial[kTraceLanes];
  const int64_t chunks = trace_chunks(a.features);
  for (int64_t n = begin; n < end; ++n) {
    acc_t total = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * kTraceChunk, last = std::min(a.features, first + kTraceChunk);
      acc_t chunk_sum = acc_t(0);
      for (int64_t k = 0; k < a.num_probes; ++k)
        chunk_sum = chunk_sum + chunk_tree_sum<T, acc_t>(probe_row<T>(a.probes, k, n), probe_row<T>(a.products, k, n),
                                                         first, last, partial);
      total = total + chunk_sum;
    }
    likelihood_finish(a, n, static_cast<double>(total));
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

// Sample n's outputs and its sum of squared scaled errors, with the sums of rk_stage_element done
// term by term over blocks of features (loops the compiler vectorises), and the squares summed as
// chunk_tree_sum sums products: lane l takes features first + l, first + l + kTraceLanes, ... of
// each chunk in increasing order, then the tree.
template <class T, class acc_t>
acc_t rk_sample_outputs(const RkStageArgs& a, int64_t n, acc_t* partial) {
  constexpr int64_t kBlock = 2 * kTraceLanes;
  const double* row = rk_row(a, n);
  const int n_in = a.num_inputs;
  const T* u[kRkMaxInputs];
  for (int i = 0; i < n_in; ++i) u[i] = static_cast<const T*>(a.inputs[i]) + n * a.features;
  alignas(64) acc_t sum[kBlock];
  const auto combine = [&](const double* c, int64_t first, int64_t count) {
    bool started = false;
    for (int i = 0; i < n_in; ++i) {
      const acc_t ci = static_cast<acc_t>(c[i]);
      if (ci == acc_t(0)) continue;
      const T* ui = u[i] + first;
      if (started) {
        for (int64_t f = 0; f < count; ++f) sum[f] = sum[f] + ci * static_cast<acc_t>(ui[f]);
      } else {
        for (int64_t f = 0; f < count; ++f) sum[f] = ci * static_cast<acc_t>(ui[f]);
      }
      started = true;
    }
    if (!started)
      for (int64_t f = 0; f < count; ++f) sum[f] = acc_t(0);
  };
  const acc_t atol = static_cast<acc_t>(a.atol), rtol = static_cast<acc_t>(a.rtol);
  acc_t total = acc_t(0);
  for (int64_t chunk = 0; chunk < trace_chunks(a.features); ++chunk) {
    const int64_t begin = chunk * kTraceChunk, end = std::min(a.features, begin + kTraceChunk);
    int used = kTraceLanes;
    if (end - begin < kTraceLanes) {
      used = 1;
      while (used < end - begin) used *= 2;
    }
    for (int lane = 0; lane < used; ++lane) partial[lane] = acc_t(0);
    for (int64_t first = begin; first < end; first += kBlock) {
      const int64_t count = std::min(kBlock, end - first);
      for (int j = 0; j < a.num_outputs; ++j) {
        combine(row + rk_output_field(n_in, j), first, count);
        T* out = static_cast<T*>(a.out[j]) + n * a.features + first;
        for (int64_t f = 0; f < count; ++f) out[f] = static_cast<T>(sum[f]);
      }
      if (!a.error) continue;
      combine(row + rk_error_field(n_in, a.num_outputs), first, count);
      for (int64_t f = 0; f < count; ++f) {
        const int lane = static_cast<int>((first - begin + f) % kTraceLanes);
        partial[lane] = partial[lane] + rk_scaled_square(sum[f], static_cast<acc_t>(u[0][first + f]),
                                                         static_cast<acc_t>(u[2][first + f]), atol, rtol);
      }
    }
    for (int stride = used / 2; stride > 0; stride /= 2)
      for (int lane = 0; lane < stride; ++lane) trace_tree_level(partial, lane, stride);
    total = total + partial[0];
  }
  return total;
}

void run_rk_stage(const RkStageArgs& a) {
  // the probe sums as probe_trace computes them (scale 1), into raw_trace
  std::vector<double> raw_trace(a.num_probes > 0 ? a.batch : 0);
  LikelihoodArgs probe_args{};
  probe_args.dtype = a.dtype;
  probe_args.batch = a.batch;
  probe_args.features = a.features;
  probe_args.num_probes = a.num_probes;
  probe_args.probes = a.probes;
  probe_args.products = a.products;
  probe_args.trace_out = raw_trace.data();
  probe_args.trace_scale = 1.0;
  const int64_t work_per_sample = std::max<int64_t>(1, a.features * (a.num_probes + a.num_inputs));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, static_cast<at::ScalarType>(a.dtype),
                                  "diffkern::rk_stage", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, a.batch, std::max<int64_t>(1, 32768 / work_per_sample), [&](int64_t begin, int64_t end) {
      if (a.num_probes > 0) likelihood_rows<scalar_t, acc_t>(probe_args, begin, end);
      alignas(64) acc_t partial[kTraceLanes];
      for (int64_t n = begin; n < end; ++n) {
        const acc_t squares = rk_sample_outputs<scalar_t, acc_t>(a, n, partial);
        rk_stage_finish(a, n, a.num_probes > 0 ? raw_trace[n] : 0.0, static_cast<double>(squares));
      }
    });
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> rk_stage_cpu(DK_RK_STAGE_PARAMS) {
  RkStageCall call = prepare_rk_stage(DK_RK_STAGE_ARGS);
  run_rk_stage(call.args);
  return {call.outputs, call.trace, call.log_density_next, call.norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("probe_trace", &probe_trace_cpu);
  m.impl("likelihood_step", &likelihood_step_cpu);
  m.impl("rk_stage", &rk_stage_cpu);
}

}  // namespace cpu
}  // namespace diffkern
