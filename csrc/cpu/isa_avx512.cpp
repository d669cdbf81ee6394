// The SIMD CPU kernels compiled for AVX-512F. Chosen at run time (isa_dispatch.cpp), so the library
// also loads on CPUs without it. Everything included after the target pragma lives in the
// diffkern::avx512 inline namespace (DK_ISA, see diffkern/macros.h); the standard and torch headers
// are included first so that their inline functions keep the baseline instruction set.
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>

#include "isa_dispatch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

#define DK_ISA avx512
#include "simd/noise_simd.h"
#include "simd/vec_avx512.h"

namespace diffkern {
namespace cpu {
void fill_normal_avx512(const NormalFillArgs& args) { simd::fill_normal_entry<VecAvx512>(args); }
}  // namespace cpu
}  // namespace diffkern

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never selected by best_isa()

namespace diffkern {
namespace cpu {
void fill_normal_avx512(const NormalFillArgs&) { TORCH_CHECK(false, "diffkern: AVX-512F kernels are x86-64 only"); }
}  // namespace cpu
}  // namespace diffkern

#endif
