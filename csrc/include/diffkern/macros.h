// Portability macros shared by the CPU and CUDA builds.
//
// Every formula in diffkern lives in a header marked DK_HOST_DEVICE, so the CPU kernels (and the
// CPU "emulation" of CUDA thread bodies used by the tests) run the very code the GPU runs.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DK_HOST_DEVICE __host__ __device__
#else
#define DK_HOST_DEVICE
#endif

#define DK_INLINE DK_HOST_DEVICE inline

#if defined(__CUDA_ARCH__)
#define DK_DEVICE_CODE 1
#else
#define DK_DEVICE_CODE 0
#endif

// The CPU kernels are compiled once per instruction set (baseline, AVX2, AVX-512: csrc/cpu/isa_*.cpp)
// and every TU inlines these headers. Their contents live in an inline namespace named after the
// instruction set of the TU, so an AVX-512 copy of an inline function can never be picked by the
// linker for baseline code (the one-definition rule problem PyTorch solves with CPU_CAPABILITY).
// Only TUs compiled for a specific ISA define DK_ISA before including any diffkern header.
#ifndef DK_ISA
#define DK_ISA base
#endif
#define DK_NAMESPACE_BEGIN \
  namespace diffkern {     \
  inline namespace DK_ISA {
#define DK_NAMESPACE_END \
  }                      \
  }

DK_NAMESPACE_BEGIN

// Bit casts that compile to nothing on either side (memcpy is the portable host form).
DK_INLINE uint32_t bits_of(float x) {
#if DK_DEVICE_CODE
  return static_cast<uint32_t>(__float_as_uint(x));
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

DK_INLINE float float_of(uint32_t u) {
#if DK_DEVICE_CODE
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

DK_NAMESPACE_END
