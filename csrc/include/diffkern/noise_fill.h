// Per-thread body of the kernels that materialise the noise stream (dk.randn, dk.random_bits).
//
// One "thread" produces one Philox block: up to 4 consecutive features of one sample. The CUDA
// __global__ wrapper only computes its global thread index and calls fill_block(); the CPU scalar
// path calls the same function for every index, which is how the indexing, tail and store logic
// that runs on the GPU is exercised by every CPU test run.
#pragma once

#include "diffkern/macros.h"
#include "diffkern/noise.h"

DK_NAMESPACE_BEGIN

// A contiguous [rows, row_size] output; dim 0 is the sample, the rest are flattened features.
struct FillShape {
  int64_t rows;
  int64_t row_size;
  int64_t blocks_per_row;  // ceil(row_size / 4)

  DK_INLINE int64_t num_threads() const { return rows * blocks_per_row; }
};

// Four values of T stored with one vector instruction when the destination is aligned.
template <typename T>
struct alignas(4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16) Pack4 {
  T v[4];
};

template <typename T>
DK_INLINE void store_pack(T* dst, const Pack4<T>& pack, int64_t count) {
  if (count == 4 && reinterpret_cast<uintptr_t>(dst) % alignof(Pack4<T>) == 0) {
    *reinterpret_cast<Pack4<T>*>(dst) = pack;
    return;
  }
  for (int64_t k = 0; k < count; ++k) dst[k] = pack.v[k];
}

// The row and block of a thread; 32-bit division when the index allows it (it is much cheaper on GPUs).
DK_INLINE void split_thread_index(int64_t thread, int64_t blocks_per_row, int64_t& row, int64_t& block) {
  if (thread <= 0xffffffffLL && blocks_per_row <= 0xffffffffLL) {
    const uint32_t t = static_cast<uint32_t>(thread), b = static_cast<uint32_t>(blocks_per_row);
    row = t / b;
    block = t - static_cast<uint32_t>(row) * b;
  } else {
    row = thread / blocks_per_row;
    block = thread - row * blocks_per_row;
  }
}

// Generators: what a thread writes for its Philox block.
template <typename T>
struct NormalGenerator {
  DK_INLINE Pack4<T> operator()(Uint4 bits) const {
    const Float4 z = normal4(bits);
    return Pack4<T>{{static_cast<T>(z.v[0]), static_cast<T>(z.v[1]), static_cast<T>(z.v[2]),
                     static_cast<T>(z.v[3])}};
  }
};

template <typename T>
struct RademacherGenerator {  // the sign bit of each word: -1 or +1
  DK_INLINE Pack4<T> operator()(Uint4 bits) const {
    const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
    Pack4<T> pack;
    for (int k = 0; k < 4; ++k) pack.v[k] = static_cast<T>(words[k] >> 31 ? -1.0f : 1.0f);
    return pack;
  }
};

struct BitsGenerator {  // raw words, reinterpreted as int32
  DK_INLINE Pack4<int32_t> operator()(Uint4 bits) const {
    return Pack4<int32_t>{{static_cast<int32_t>(bits.x), static_cast<int32_t>(bits.y),
                           static_cast<int32_t>(bits.z), static_cast<int32_t>(bits.w)}};
  }
};

template <typename T, typename Generator>
DK_INLINE void fill_block(int64_t thread, T* out, const FillShape& shape, const NoiseParams& params,
                          Generator generate) {
  int64_t row, block;
  split_thread_index(thread, shape.blocks_per_row, row, block);
  const NoiseKey key = resolve_noise_key(params);
  const Pack4<T> pack = generate(noise_bits(key, static_cast<uint32_t>(block),
                                            static_cast<uint32_t>(row + params.sample_offset)));
  const int64_t first = 4 * block;
  const int64_t count = shape.row_size - first < 4 ? shape.row_size - first : 4;
  store_pack(out + row * shape.row_size + first, pack, count);
}

// Row i of the raw philox4x32_10 op: counter[i, 0..3], key[i, 0..1] (low 32 bits of int64 each)
// -> out[i, 0..3] in [0, 2^32).
DK_INLINE void philox_table_row(int64_t i, const int64_t* counter, const int64_t* key, int64_t* out) {
  const Uint4 r = philox4x32_10(
      Uint4{static_cast<uint32_t>(counter[4 * i]), static_cast<uint32_t>(counter[4 * i + 1]),
            static_cast<uint32_t>(counter[4 * i + 2]), static_cast<uint32_t>(counter[4 * i + 3])},
      static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1]));
  out[4 * i] = r.x;
  out[4 * i + 1] = r.y;
  out[4 * i + 2] = r.z;
  out[4 * i + 3] = r.w;
}

DK_NAMESPACE_END
