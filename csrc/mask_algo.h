// The mask algorithm shared by masks_cpu.cpp, masks_cuda.cu and (mirrored in torch int64
// arithmetic) mcf_fast/masking.py. Any change here must be made in all three; the tests compare
// the C++ output with the torch mirror bit for bit.
//
// Row (view v, sample s) of step t under seed S draws from its own Philox stream:
//   key     = (S & 0xffffffff, S >> 32)
//   counter = (d / 4, (v << 16) | (s >> 32) & 0xffff, s & 0xffffffff, t), u32 #d = lane d % 4
// so a row never depends on which other rows are in the batch, on threads, or on the device.
// Limits (checked by the Python wrapper): step < 2^32, sample id < 2^48, views <= 2^16.
//
// Selection: partial Fisher-Yates over perm = [0, L): for i < M, swap perm[i] with
// perm[i + bounded(L - i)], M = min(K, L - K) (the smaller side, a pure function of (L, K), so
// every implementation makes the same choice). perm[0:M] is then the kept set when K <= L - K,
// else the removed set. One linear pass over a flag array emits the ascending outputs (no sort).
#pragma once
#include "philox.h"

namespace mcf_fast {

struct RowKey {
  uint32_t k0, k1;  // Philox key = seed
  uint32_t c1, c2, c3;  // counter words 1..3; word 0 is the block index within the row
};

MCF_HD RowKey make_row_key(uint64_t seed, uint64_t step, uint64_t sample_id, uint32_t view) {
  RowKey k;
  k.k0 = static_cast<uint32_t>(seed);
  k.k1 = static_cast<uint32_t>(seed >> 32);
  k.c1 = (view << 16) | static_cast<uint32_t>((sample_id >> 32) & 0xffffu);
  k.c2 = static_cast<uint32_t>(sample_id);
  k.c3 = static_cast<uint32_t>(step);
  return k;
}

MCF_HD Philox4 row_block(const RowKey& k, uint32_t block) {
  Philox4 c;
  c.v[0] = block;
  c.v[1] = k.c1;
  c.v[2] = k.c2;
  c.v[3] = k.c3;
  return philox4x32_10(c, k.k0, k.k1);
}

// Lane `i` of a block without dynamic indexing, which would put the block in local memory on GPU.
MCF_HD uint32_t philox_lane(const Philox4& b, uint32_t i) {
  const uint32_t lo = (i & 1u) ? b.v[1] : b.v[0];
  const uint32_t hi = (i & 1u) ? b.v[3] : b.v[2];
  return (i & 2u) ? hi : lo;
}

// Sequential reader of a row's u32 stream: draw #d is lane d % 4 of block d / 4.
struct RowStream {
  RowKey key;
  uint32_t next;  // index of the next draw
  Philox4 buf;

  MCF_HD explicit RowStream(const RowKey& k) : key(k), next(0), buf{{0u, 0u, 0u, 0u}} {}

  MCF_HD uint32_t draw() {
    const uint32_t lane = next & 3u;
    if (lane == 0) buf = row_block(key, next >> 2);
    ++next;
    return philox_lane(buf, lane);
  }
};

// Unbiased integer in [0, range), 0 < range < 2^32, by Lemire's multiply-shift with rejection
// (ACM TOMACS 2019): reject the low products below 2^32 mod range, which are the only ones that
// would over-represent some outputs. Rejection probability < range / 2^32 (< 5e-8 for L = 196).
template <class Draw>
MCF_HD uint32_t bounded_draw(Draw& draw, uint32_t range) {
  uint64_t m = static_cast<uint64_t>(draw()) * range;
  uint32_t low = static_cast<uint32_t>(m);
  if (low < range) {
    const uint32_t threshold = (0u - range) % range;  // 2^32 mod range
    while (low < threshold) {
      m = static_cast<uint64_t>(draw()) * range;
      low = static_cast<uint32_t>(m);
    }
  }
  return static_cast<uint32_t>(m >> 32);
}

// Number of Fisher-Yates steps: select whichever side is smaller.
MCF_HD uint32_t num_selected(uint32_t L, uint32_t K) { return K <= L - K ? K : L - K; }
MCF_HD bool selects_kept(uint32_t L, uint32_t K) { return K <= L - K; }

// Partial Fisher-Yates on perm (must hold 0..L-1 on entry): afterwards perm[0:M] is the
// selected set (unordered). `draw` yields the row's u32 stream in order.
template <class Draw>
MCF_HD void partial_fisher_yates(uint32_t* perm, uint32_t L, uint32_t M, Draw& draw) {
  for (uint32_t i = 0; i < M; ++i) {
    const uint32_t j = i + bounded_draw(draw, L - i);
    const uint32_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
}

}  // namespace mcf_fast
