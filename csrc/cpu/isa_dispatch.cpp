// Run-time choice of the CPU instruction set for the SIMD kernels.
#include "isa_dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace diffkern {
namespace cpu {
namespace {

Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa parse(const char* name, Isa best) {
  if (std::strcmp(name, "auto") == 0 || name[0] == '\0') return best;
  Isa isa;
  if (std::strcmp(name, "scalar") == 0) {
    isa = Isa::kScalar;
  } else if (std::strcmp(name, "avx2") == 0) {
    isa = Isa::kAvx2;
  } else if (std::strcmp(name, "avx512") == 0) {
    isa = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "diffkern: unknown CPU instruction set '", name, "' (auto, scalar, avx2, avx512)");
  }
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(best), "diffkern: this CPU does not support ", name,
              " (best: ", isa_name(best), ")");
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa best_isa() {
  static const Isa isa = [] {
    const Isa supported = detect_isa();
    const char* requested = std::getenv("DIFFKERN_CPU_ISA");
    return requested ? parse(requested, supported) : supported;
  }();
  return isa;
}

Isa isa_from_name(const char* name) { return parse(name, best_isa()); }

}  // namespace cpu
}  // namespace diffkern
