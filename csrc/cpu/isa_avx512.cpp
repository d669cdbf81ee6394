// The SIMD CPU kernels compiled for AVX-512F (+ AVX2, FMA, F16C); chosen at run time by isa_dispatch.cpp.
#define DK_ISA avx512
#define DK_ISA_TARGET "avx512f,avx2,fma,f16c"
#define DK_ISA_VEC VecAvx512
#define DK_ISA_VEC_HEADER "simd/vec_avx512.h"
#include "isa_unit.inc"
