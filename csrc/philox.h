// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind cuRAND's and torch's
// CUDA RNG: same multipliers, Weyl key increments and 10 rounds, so Random123's known-answer
// vectors hold (tests/test_masks.py checks them through the torch mirror of this file).
//
// Header-only and host/device inline so the CPU (OpenMP) and CUDA mask generators compile the very
// same function and are bit-identical by construction.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MCF_HD __host__ __device__ __forceinline__
#define MCF_UNROLL _Pragma("unroll")
#else
#define MCF_HD inline
#define MCF_UNROLL _Pragma("GCC unroll 10")
#endif

namespace mcf_fast {

struct Philox4 {
  uint32_t v[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

MCF_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *lo = a * b;
  *hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *lo = static_cast<uint32_t>(p);
  *hi = static_cast<uint32_t>(p >> 32);
#endif
}

// One Philox4x32 block: 4 independent 32-bit outputs for a 128-bit counter under a 64-bit key.
MCF_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
MCF_UNROLL
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, ctr.v[0], &hi0, &lo0);
    philox_mulhilo(kPhiloxM1, ctr.v[2], &hi1, &lo1);
    Philox4 next;
    next.v[0] = hi1 ^ ctr.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ ctr.v[3] ^ k1;
    next.v[3] = lo0;
    ctr = next;
  }
  return ctr;
}

}  // namespace mcf_fast
