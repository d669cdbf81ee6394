// Run-time choice of the CPU instruction set for the SIMD kernels.
#include "isa_dispatch.h"

#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

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

// An instruction-set name, in any case; `source` names where it came from in errors.
Isa parse(const char* name, Isa best, const char* source) {
  std::string lower(name);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (lower == "auto" || lower.empty()) return best;
  Isa isa;
  if (lower == "scalar") {
    isa = Isa::kScalar;
  } else if (lower == "avx2") {
    isa = Isa::kAvx2;
  } else if (lower == "avx512") {
    isa = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "diffkern: ", source, "'", name, "' is not a CPU instruction set (auto, scalar, avx2, avx512)");
  }
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(best), "diffkern: ", source, "this CPU does not support ",
              name, " (best: ", isa_name(best), ")");
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
    return requested ? parse(requested, supported, "DIFFKERN_CPU_ISA=") : supported;
  }();
  return isa;
}

Isa isa_from_name(const char* name) { return parse(name, best_isa(), ""); }

}  // namespace cpu
}  // namespace diffkern
