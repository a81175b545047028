// Entry points of mcf_fast._C's mask op, one per device; ops.cpp registers them.
#pragma once
#include <tuple>

#include <ATen/core/Tensor.h>

namespace mcf_fast {

// Argument checks shared by every backend (sizes, ranges, sample_ids dtype/shape).
void check_mask_args(const at::Tensor& sample_ids, int64_t num_patches, int64_t num_keep,
                     int64_t views, int64_t step);

// Outputs: ids_keep int64 [V, N, K] ascending, ids_restore int64 [V, N, L], mask bool [V, N, L].
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masks_cpu(
    const at::Tensor& sample_ids, int64_t num_patches, int64_t num_keep, int64_t views,
    int64_t seed, int64_t step);

#ifdef MCF_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masks_cuda(
    const at::Tensor& sample_ids, int64_t num_patches, int64_t num_keep, int64_t views,
    int64_t seed, int64_t step);
#endif

}  // namespace mcf_fast
