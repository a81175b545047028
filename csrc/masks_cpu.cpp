// CPU mask generator: OpenMP over rows, one partial Fisher-Yates + one linear pass per row.
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "mask_algo.h"
#include "masks.h"

namespace mcf_fast {

void check_mask_args(const at::Tensor& sample_ids, int64_t num_patches, int64_t num_keep,
                     int64_t views, int64_t step) {
  TORCH_CHECK(sample_ids.dim() == 1 && sample_ids.scalar_type() == at::kLong,
              "mcf_fast::random_masks: sample_ids must be a 1-D int64 tensor, got ",
              sample_ids.scalar_type(), " of shape ", sample_ids.sizes());
  TORCH_CHECK(num_patches >= 1 && num_patches <= INT32_MAX,
              "mcf_fast::random_masks: num_patches must be in [1, 2^31 - 1], got ", num_patches);
  TORCH_CHECK(num_keep >= 1 && num_keep <= num_patches,
              "mcf_fast::random_masks: num_keep must be in [1, num_patches=", num_patches,
              "], got ", num_keep);
  TORCH_CHECK(views >= 1 && views <= 65536,
              "mcf_fast::random_masks: views must be in [1, 65536], got ", views);
  TORCH_CHECK(step >= 0 && step <= static_cast<int64_t>(UINT32_MAX),
              "mcf_fast::random_masks: step must be in [0, 2^32 - 1], got ", step);
}

namespace {

// Emits one row from its selection flags: kept ids ascending, ids_restore = rank among kept
// (kept) or K + rank among removed (removed), mask = removed. Branch-free (a kept/removed branch
// mispredicts on random masks): every position writes its id to keep_tmp[kept_before], which
// needs K + 1 slots because removed positions after the last kept one write to slot K.
void emit_row(const uint8_t* sel, bool sel_is_kept, uint32_t L, uint32_t K, int64_t* keep_tmp,
              int64_t* keep, int64_t* restore, bool* mask) {
  const uint8_t flip = sel_is_kept ? 0 : 1;
  int64_t kept_before = 0;
  for (uint32_t l = 0; l < L; ++l) {
    const int64_t kept = sel[l] ^ flip;
    keep_tmp[kept_before] = l;
    restore[l] = kept ? kept_before : static_cast<int64_t>(K) + l - kept_before;
    mask[l] = !kept;
    kept_before += kept;
  }
  std::memcpy(keep, keep_tmp, sizeof(int64_t) * K);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masks_cpu(
    const at::Tensor& sample_ids_in, int64_t num_patches, int64_t num_keep, int64_t views,
    int64_t seed, int64_t step) {
  check_mask_args(sample_ids_in, num_patches, num_keep, views, step);
  TORCH_CHECK(sample_ids_in.device().is_cpu(), "mcf_fast::random_masks_cpu got a ",
              sample_ids_in.device(), " tensor");
  const at::Tensor sample_ids = sample_ids_in.contiguous();
  const int64_t N = sample_ids.size(0);
  const int64_t* sid = sample_ids.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(sid[n] >= 0 && sid[n] < (int64_t(1) << 48),
                "mcf_fast::random_masks: sample_ids must be in [0, 2^48), got ", sid[n],
                " at position ", n);
  }
  const auto L = static_cast<uint32_t>(num_patches);
  const auto K = static_cast<uint32_t>(num_keep);
  const uint32_t M = num_selected(L, K);
  const bool sel_is_kept = selects_kept(L, K);
  const auto useed = static_cast<uint64_t>(seed);  // two's complement: seeds >= 2^63 come in negative

  auto opts = sample_ids.options();
  at::Tensor ids_keep = at::empty({views, N, num_keep}, opts.dtype(at::kLong));
  at::Tensor ids_restore = at::empty({views, N, num_patches}, opts.dtype(at::kLong));
  at::Tensor mask = at::empty({views, N, num_patches}, opts.dtype(at::kBool));
  int64_t* keep_p = ids_keep.data_ptr<int64_t>();
  int64_t* restore_p = ids_restore.data_ptr<int64_t>();
  bool* mask_p = mask.data_ptr<bool>();

  const int64_t rows = views * N;
  // One row of L = 196 takes ~1 us. Below ~2^18 output positions (~1 ms of work) a second
  // thread saves less than a parallel region can cost on a loaded machine (measured 2026-11-26:
  // 0.6 ms on 1 thread vs 12-36 ms on 2 threads with the 2 cores oversubscribed), so stay serial.
  const int nthreads = rows * num_patches < (int64_t(1) << 18) ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<uint32_t> perm(L);
    std::vector<uint8_t> sel(L);
    std::vector<int64_t> keep_tmp(static_cast<size_t>(K) + 1);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t v = r / N, n = r % N;
      RowStream stream(make_row_key(useed, static_cast<uint64_t>(step),
                                    static_cast<uint64_t>(sid[n]), static_cast<uint32_t>(v)));
      auto draw = [&stream]() { return stream.draw(); };
      for (uint32_t l = 0; l < L; ++l) perm[l] = l;
      partial_fisher_yates(perm.data(), L, M, draw);
      std::memset(sel.data(), 0, L);
      for (uint32_t i = 0; i < M; ++i) sel[perm[i]] = 1;
      emit_row(sel.data(), sel_is_kept, L, K, keep_tmp.data(), keep_p + r * num_keep, restore_p + r * num_patches,
               mask_p + r * num_patches);
    }
  }
  return {ids_keep, ids_restore, mask};
}

}  // namespace mcf_fast
