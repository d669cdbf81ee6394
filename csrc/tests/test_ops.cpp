// C++ users' view of diffkern: the ops through the dispatcher, as registered by libdiffkern_ops.
// Checks that every CPU instruction set gives the numbers of the header-only noise contract.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "diffkern/noise.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

at::Tensor randn_on(const std::string& isa, std::vector<int64_t> size, int64_t seed, int64_t step,
                    int64_t offset, int64_t stream, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("diffkern::_noise_cpu_isa", "")
                             .typed<at::Tensor(c10::SymIntArrayRef, int64_t, int64_t, int64_t, int64_t,
                                               at::ScalarType, c10::string_view, bool)>();
  return op.call(c10::fromIntArrayRefSlow(size), seed, step, offset, stream, dtype, isa, false);
}

}  // namespace

int main() {
  const std::string info = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("diffkern::build_info", "")
                               .typed<std::string()>()
                               .call();
  std::printf("build_info: %s\n", info.c_str());
  const std::string best = info.substr(info.find("cpu_isa=") + 8);
  std::vector<std::string> isas = {"scalar"};
  if (best == "avx2" || best == "avx512") isas.push_back("avx2");
  if (best == "avx512") isas.push_back("avx512");

  const std::vector<std::vector<int64_t>> shapes = {{3, 37}, {1000}, {9, 2}, {5, 3}, {2, 3, 16, 16}, {0, 4}};
  for (const auto& shape : shapes) {
    for (const std::string& isa : isas) {
      int64_t features = 1;
      for (size_t d = 1; d < shape.size(); ++d) features *= shape[d];
      const at::Tensor z = randn_on(isa, shape, 99, 3, 11, 2, at::kFloat).reshape({shape[0], features});
      const diffkern::NoiseKey key{99, 0, 3, 2};
      bool same = true;
      for (int64_t n = 0; n < z.size(0); ++n)
        for (int64_t j = 0; j < z.size(1); ++j) {
          const diffkern::Float4 e = diffkern::noise_normal4(key, j / 4, n + 11);
          same = same && z[n][j].item<float>() == e.v[j % 4];
        }
      expect(same, "randn on " + isa + " differs from the noise contract for shape of " +
                       std::to_string(z.numel()) + " elements");
    }
  }
  if (failures) return EXIT_FAILURE;
  std::printf("all op tests passed (%zu instruction sets)\n", isas.size());
  return EXIT_SUCCESS;
}
