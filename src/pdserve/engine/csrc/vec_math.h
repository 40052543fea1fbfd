// Small math shared by the native kernels, written so that loops over it vectorize.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pdserve_native {

// Cephes' expf, branch-free so that loops over it vectorize: x = n ln2 + r, exp(r) by its polynomial; the callers
// apply 2^n for their range. Returns exp(r) and sets n.
inline float exp_reduced(float x, float& n) {
  n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

inline float pow2(int32_t n) {  // 2^n for n in [-126, 128] (128: the exponent field 255, i.e. inf)
  const int32_t e = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return scale;
}

// exp(x) for x <= 0 (softmax after subtracting the max; silu of either sign).
inline float exp_nonpos(float x) {
  float n;
  const float p = exp_reduced(std::max(x, -87.0f), n);
  // n is NaN when x is (p is then NaN too): clamped before the cast, which is undefined for NaN
  return p * pow2(static_cast<int32_t>(std::fmin(std::fmax(n, -126.0f), 128.0f)));
}

// exp(x) for x >= 0, overflowing to inf past log(FLT_MAX) as IEEE expf does: 2^n applied as 2^(n-1) * 2 so that
// n = 128 still has a normal scale.
inline float exp_nonneg(float x) {
  float n;
  const float p = exp_reduced(std::min(x, 89.0f), n);
  return p * pow2(static_cast<int32_t>(std::fmin(std::fmax(n, 0.0f), 128.0f)) - 1) * 2.0f;  // NaN: as above
}

// bf16 <-> float as bits, branch-free (c10::BFloat16's rounding branches on NaN, which keeps loops scalar): round to
// nearest even, NaN -> 0x7FC0, exactly as c10 rounds.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
inline uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}
inline float round_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

}  // namespace pdserve_native
