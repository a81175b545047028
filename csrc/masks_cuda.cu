// CUDA mask generator: one 128-thread block per row. The permutation lives in shared memory
// (global workspace for very long rows); Philox blocks are precomputed in parallel, thread 0
// runs the inherently serial Fisher-Yates swaps, then the whole block emits the ascending
// outputs tile by tile with ballot/popc prefix counts (no sort). Same header as the CPU path, so
// the same key gives the same bits.
#ifdef MCF_FAST_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "mask_algo.h"
#include "masks.h"

namespace mcf_fast {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
// One Philox block per thread up front = 512 draws; enough for M <= 512 without rejections,
// later draws are computed on the fly by thread 0.
constexpr uint32_t kBufBlocks = kThreads;
// Dynamic shared memory we allow before moving perm/flags to a global workspace: stays under
// the 48 KiB default so no opt-in attribute is needed (L <= ~7800).
constexpr size_t kMaxDynamicSmem = 38 * 1024;

// Thread 0's view of the row stream: precomputed draws first, then fresh Philox blocks.
struct BufferedStream {
  const uint32_t* buf;
  uint32_t nbuf;  // multiple of 4
  RowKey key;
  uint32_t next;
  Philox4 blk;

  __device__ uint32_t operator()() {
    const uint32_t d = next++;
    if (d < nbuf) return buf[d];
    const uint32_t lane = d & 3u;
    if (lane == 0) blk = row_block(key, d >> 2);
    return philox_lane(blk, lane);
  }
};

__global__ void __launch_bounds__(kThreads)
random_masks_kernel(const int64_t* __restrict__ sample_ids, int64_t N, uint32_t L, uint32_t K,
                    uint64_t seed, uint32_t step, uint32_t* __restrict__ workspace,
                    int64_t* __restrict__ ids_keep, int64_t* __restrict__ ids_restore,
                    bool* __restrict__ mask) {
  extern __shared__ uint32_t smem[];
  __shared__ uint32_t draws[4 * kBufBlocks];
  __shared__ uint32_t warp_counts[kWarps];

  const int64_t row = static_cast<int64_t>(blockIdx.x);  // row = view * N + n
  const int64_t v = row / N;
  const int64_t n = row - v * N;
  const uint32_t words = L + (L + 3) / 4;  // perm (u32) + flags (u8)
  uint32_t* perm = workspace != nullptr ? workspace + row * words : smem;
  uint8_t* sel = reinterpret_cast<uint8_t*>(perm + L);

  const RowKey key = make_row_key(seed, step, static_cast<uint64_t>(sample_ids[n]),
                                  static_cast<uint32_t>(v));
  const uint32_t M = num_selected(L, K);
  const uint32_t nblk = min((M + 3) / 4, kBufBlocks);

  for (uint32_t l = threadIdx.x; l < L; l += kThreads) {
    perm[l] = l;
    sel[l] = 0;
  }
  if (threadIdx.x < nblk) {
    const Philox4 b = row_block(key, threadIdx.x);
#pragma unroll
    for (int i = 0; i < 4; ++i) draws[4 * threadIdx.x + i] = b.v[i];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    BufferedStream stream{draws, 4 * nblk, key, 0u, {}};
    partial_fisher_yates(perm, L, M, stream);
  }
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < M; i += kThreads) sel[perm[i]] = 1;
  __syncthreads();

  const bool sel_is_kept = selects_kept(L, K);
  const uint32_t lane = threadIdx.x & 31u;
  const uint32_t warp = threadIdx.x >> 5;
  int64_t* keep_row = ids_keep + row * K;
  int64_t* restore_row = ids_restore + row * L;
  bool* mask_row = mask + row * L;
  uint32_t kept_so_far = 0;  // kept positions in earlier tiles
  for (uint32_t tile = 0; tile < L; tile += kThreads) {
    const uint32_t l = tile + threadIdx.x;
    const bool valid = l < L;
    const bool kept = valid && ((sel[l] != 0) == sel_is_kept);
    const uint32_t ballot = __ballot_sync(0xffffffffu, kept);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    uint32_t before = kept_so_far + __popc(ballot & ((1u << lane) - 1u));
    uint32_t tile_total = 0;
#pragma unroll
    for (uint32_t w = 0; w < kWarps; ++w) {
      const uint32_t c = warp_counts[w];
      before += w < warp ? c : 0u;
      tile_total += c;
    }
    if (valid) {
      if (kept) keep_row[before] = l;
      restore_row[l] = kept ? static_cast<int64_t>(before)
                            : static_cast<int64_t>(K) + static_cast<int64_t>(l - before);
      mask_row[l] = !kept;
    }
    kept_so_far += tile_total;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masks_cuda(
    const at::Tensor& sample_ids_in, int64_t num_patches, int64_t num_keep, int64_t views,
    int64_t seed, int64_t step) {
  check_mask_args(sample_ids_in, num_patches, num_keep, views, step);
  TORCH_CHECK(sample_ids_in.is_cuda(), "mcf_fast::random_masks_cuda got a ",
              sample_ids_in.device(), " tensor");
  const c10::cuda::CUDAGuard guard(sample_ids_in.device());
  const at::Tensor sample_ids = sample_ids_in.contiguous();
  const int64_t N = sample_ids.size(0);
  const int64_t rows = views * N;
  TORCH_CHECK(rows <= INT32_MAX, "mcf_fast::random_masks: views * batch_size must be < 2^31, got ",
              rows);
  auto opts = sample_ids.options();
  at::Tensor ids_keep = at::empty({views, N, num_keep}, opts.dtype(at::kLong));
  at::Tensor ids_restore = at::empty({views, N, num_patches}, opts.dtype(at::kLong));
  at::Tensor mask = at::empty({views, N, num_patches}, opts.dtype(at::kBool));
  if (rows == 0) return {ids_keep, ids_restore, mask};

  const auto L = static_cast<uint32_t>(num_patches);
  const int64_t words = num_patches + (num_patches + 3) / 4;
  const size_t smem_bytes = static_cast<size_t>(words) * sizeof(uint32_t);
  at::Tensor workspace;
  uint32_t* ws = nullptr;
  size_t dyn_smem = smem_bytes;
  if (smem_bytes > kMaxDynamicSmem) {
    workspace = at::empty({rows, words}, opts.dtype(at::kInt));
    ws = reinterpret_cast<uint32_t*>(workspace.data_ptr<int32_t>());
    dyn_smem = 0;
  }
  random_masks_kernel<<<static_cast<unsigned>(rows), kThreads, dyn_smem,
                        c10::cuda::getCurrentCUDAStream()>>>(
      sample_ids.data_ptr<int64_t>(), N, L, static_cast<uint32_t>(num_keep),
      static_cast<uint64_t>(seed), static_cast<uint32_t>(step), ws, ids_keep.data_ptr<int64_t>(),
      ids_restore.data_ptr<int64_t>(), mask.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ids_keep, ids_restore, mask};
}

}  // namespace mcf_fast
#endif  // MCF_FAST_WITH_CUDA
