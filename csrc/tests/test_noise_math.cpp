// Tests of the header-only noise math (no torch needed): Philox4x32-10 against the Random123
// known-answer vectors, the accuracy of the float32 Box-Muller transform against float64, and the
// thread-index arithmetic of the CUDA fill body, run on the CPU.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "diffkern/noise.h"
#include "diffkern/noise_fill.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                 \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

using diffkern::Uint4;

void test_known_answers() {
  // Random123 kat_vectors, philox4x32 with 10 rounds: counter, key -> output.
  struct Kat {
    Uint4 counter;
    uint32_t key0, key1;
    Uint4 expected;
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, 0, 0, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, 0xffffffff, 0xffffffff,
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, 0xa4093822, 0x299f31d0,
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const Uint4 r = diffkern::philox4x32_10(k.counter, k.key0, k.key1);
    EXPECT(r.x == k.expected.x && r.y == k.expected.y && r.z == k.expected.z && r.w == k.expected.w,
           "got %08x %08x %08x %08x", r.x, r.y, r.z, r.w);
  }
}

// Box-Muller in float64 of the same words: the uniform is the float32 value the kernel forms
// (exact), the angle 2 pi w / 2^32 (exact), everything else in double.
void box_muller_double(uint32_t radius_word, uint32_t angle_word, double& z0, double& z1) {
  const double u = diffkern::uniform_open_closed(radius_word);
  const double radius = std::sqrt(-2.0 * std::log(u));
  const double angle = 2.0 * M_PI * (angle_word / 4294967296.0);
  z0 = radius * std::cos(angle);
  z1 = radius * std::sin(angle);
}

// |float32 transform - float64 transform| <= 3e-7 + 2e-7 |z| (about two float32 ulps) (diffkern/reference.py states the same
// bound), over edge words and 2^22 words from the generator itself.
void test_transform_accuracy() {
  double worst_ratio = 0.0;
  auto check = [&](uint32_t w0, uint32_t w1) {
    float z0, z1;
    diffkern::box_muller(w0, w1, z0, z1);
    double r0, r1;
    box_muller_double(w0, w1, r0, r1);
    for (const auto& [z, r] : {std::pair<float, double>{z0, r0}, std::pair<float, double>{z1, r1}}) {
      const double bound = 3e-7 + 2e-7 * std::fabs(r);
      const double ratio = std::fabs(z - r) / bound;
      if (ratio > worst_ratio) worst_ratio = ratio;
      EXPECT(std::isfinite(z) && ratio <= 1.0, "words %08x %08x: %.9g vs %.9g", w0, w1, z, r);
    }
  };
  const uint32_t edges[] = {0u,          1u,          2u,          3u,          0x1fffffffu, 0x20000000u,
                            0x3fffffffu, 0x40000000u, 0x5fffffffu, 0x60000000u, 0x7fffffffu, 0x80000000u,
                            0x9fffffffu, 0xa0000000u, 0xbfffffffu, 0xc0000000u, 0xdfffffffu, 0xe0000000u,
                            0xfffffffeu, 0xffffffffu};
  for (uint32_t a : edges)
    for (uint32_t b : edges) check(a, b);
  for (uint32_t i = 0; i < (1u << 20); ++i) {
    const Uint4 w = diffkern::philox4x32_10(Uint4{i, 7, 0, 0}, 12345, 0);
    check(w.x, w.y);
    check(w.z, w.w);
    check(w.x, i << 12);  // sweep the angle finely
    check(i << 12, w.y);  // and the radius
  }
  // The largest radius: u = 2^-32 gives sqrt(64 ln 2).
  float z0, z1;
  diffkern::box_muller(0u, 0u, z0, z1);
  EXPECT(std::fabs(z0 - 6.66043212f) < 1e-5f && z1 == 0.0f, "max radius %.9g %.9g", z0, z1);
  std::printf("transform: worst error / bound = %.3f\n", worst_ratio);
}

void test_split_thread_index() {
  const int64_t cases[][2] = {{0, 1},           {5, 1},          {0xffffffffLL, 3}, {0x100000000LL, 3},
                              {0x123456789LL, 7}, {(1LL << 40) + 5, 1LL << 33}, {99, 0x100000001LL}};
  for (const auto& c : cases) {
    int64_t row, block;
    diffkern::split_thread_index(c[0], c[1], row, block);
    EXPECT(row == c[0] / c[1] && block == c[0] % c[1], "thread %lld per row %lld", (long long)c[0],
           (long long)c[1]);
  }
}

// The CUDA fill body, "launched" over every thread index of odd shapes, against a direct
// evaluation of the noise contract for each element.
void test_fill_body() {
  const int64_t shapes[][2] = {{1, 1}, {3, 1}, {2, 3}, {5, 4}, {4, 7}, {3, 33}, {0, 5}, {5, 0}};
  const diffkern::NoiseParams params{0x0123456789abcdefULL, 17, 3, 1000, nullptr};
  for (const auto& s : shapes) {
    const diffkern::FillShape shape{s[0], s[1], (s[1] + 3) / 4};
    // One extra element each side: the body must not write outside the tensor.
    std::vector<float> out(shape.rows * shape.row_size + 2, -99.0f);
    for (int64_t t = 0; t < shape.num_threads(); ++t)
      diffkern::fill_block(t, out.data() + 1, shape, params, diffkern::NormalGenerator<float>{});
    EXPECT(out.front() == -99.0f && out.back() == -99.0f, "wrote outside [%lld, %lld]", (long long)s[0],
           (long long)s[1]);
    const diffkern::NoiseKey key = diffkern::resolve_noise_key(params);
    for (int64_t n = 0; n < shape.rows; ++n)
      for (int64_t j = 0; j < shape.row_size; ++j) {
        const diffkern::Float4 z =
            diffkern::noise_normal4(key, static_cast<uint32_t>(j / 4), static_cast<uint32_t>(n + 1000));
        EXPECT(out[1 + n * shape.row_size + j] == z.v[j % 4], "element (%lld, %lld)", (long long)n,
               (long long)j);
      }
  }
  // seed_step in memory overrides seed and step.
  const int64_t seed_step[2] = {42, 9};
  const diffkern::NoiseParams from_memory{1, 2, 0, 0, seed_step};
  const diffkern::NoiseKey key = diffkern::resolve_noise_key(from_memory);
  EXPECT(key.key0 == 42 && key.key1 == 0 && key.step == 9, "seed_step not used");
}

}  // namespace

int main() {
  test_known_answers();
  test_transform_accuracy();
  test_split_thread_index();
  test_fill_body();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("all noise math tests passed\n");
  return EXIT_SUCCESS;
}
