// The tree sum of a CUDA block's lane values in the order of diffkern/trace_math.h, shared by the
// kernels that reduce over features (the trace, Runge-Kutta stages, the training loss).
#pragma once

#include "diffkern/trace_math.h"

namespace diffkern {
namespace cuda {

// partial[lane] set by every lane of a block of kTraceLanes threads: the sum in partial[0].
template <class acc_t>
__device__ inline void block_tree_sum(acc_t* partial, int lane) {
  __syncthreads();
  for (int stride = kTraceLanes / 2; stride > 0; stride /= 2) {
    trace_tree_level(partial, lane, stride);
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace diffkern
