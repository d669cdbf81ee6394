// The SIMD CPU kernels compiled for AVX2 + FMA + F16C; chosen at run time by isa_dispatch.cpp.
#define DK_ISA avx2
#define DK_ISA_TARGET "avx2,fma,f16c"
#define DK_ISA_VEC VecAvx2
#define DK_ISA_VEC_HEADER "simd/vec_avx2.h"
#include "isa_unit.inc"
