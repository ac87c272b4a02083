// bfloat16 <-> float32 for the kernels (paged_attention.cpp, qmatmul.cpp): a bfloat16 is the top half of a
// float32, so widening is a shift; narrowing rounds to nearest even, bit-identical to torch's cast.
#pragma once
#include <cstdint>
#include <cstring>

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store(float x, float* out) { *out = x; }
inline void store(float x, uint16_t* out) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) { *out = 0x7fc0; return; }  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  *out = uint16_t(u >> 16);
}
