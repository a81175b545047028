// Registers mcf_fast::random_masks with CPU, CUDA (when built with it) and Meta kernels; the Meta
// kernel gives torch.compile / FakeTensor the output shapes without running anything.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "masks.h"

namespace mcf_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masks_meta(
    const at::Tensor& sample_ids, int64_t num_patches, int64_t num_keep, int64_t views,
    int64_t /*seed*/, c10::SymInt step) {
  // Only host-side checks: a data-dependent check of sample_ids has no meaning on meta.
  TORCH_CHECK(sample_ids.dim() == 1 && sample_ids.scalar_type() == at::kLong,
              "mcf_fast::random_masks: sample_ids must be a 1-D int64 tensor, got ",
              sample_ids.scalar_type(), " of shape ", sample_ids.sizes());
  TORCH_CHECK(num_keep >= 1 && num_keep <= num_patches,
              "mcf_fast::random_masks: num_keep must be in [1, num_patches]");
  TORCH_CHECK(views >= 1 && views <= 65536, "mcf_fast::random_masks: views must be in [1, 65536]");
  (void)step;
  auto opts = sample_ids.options();
  c10::SymInt N = sample_ids.sym_size(0);
  return {at::empty_symint({views, N, num_keep}, opts.dtype(at::kLong)),
          at::empty_symint({views, N, num_patches}, opts.dtype(at::kLong)),
          at::empty_symint({views, N, num_patches}, opts.dtype(at::kBool))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masks_cpu_op(
    const at::Tensor& sample_ids, int64_t num_patches, int64_t num_keep, int64_t views,
    int64_t seed, c10::SymInt step) {
  return random_masks_cpu(sample_ids, num_patches, num_keep, views, seed, step.expect_int());
}

#ifdef MCF_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> random_masks_cuda_op(
    const at::Tensor& sample_ids, int64_t num_patches, int64_t num_keep, int64_t views,
    int64_t seed, c10::SymInt step) {
  return random_masks_cuda(sample_ids, num_patches, num_keep, views, seed, step.expect_int());
}
#endif

}  // namespace
}  // namespace mcf_fast

// step is SymInt so that a compiled training step does not recompile for every new step value.
TORCH_LIBRARY(mcf_fast, m) {
  m.def(
      "random_masks(Tensor sample_ids, int num_patches, int num_keep, int views, int seed, "
      "SymInt step) -> (Tensor ids_keep, Tensor ids_restore, Tensor mask)");
}

TORCH_LIBRARY_IMPL(mcf_fast, CPU, m) { m.impl("random_masks", &mcf_fast::random_masks_cpu_op); }
TORCH_LIBRARY_IMPL(mcf_fast, Meta, m) { m.impl("random_masks", &mcf_fast::random_masks_meta); }
#ifdef MCF_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mcf_fast, CUDA, m) { m.impl("random_masks", &mcf_fast::random_masks_cuda_op); }
#endif

// `import mcf_fast._C` loads the library (and so the registrations above); the module itself is
// empty. Reports whether the CUDA kernels were compiled in, for the Python dispatcher.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mcf_fast compiled ops", -1,
                                   nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef MCF_FAST_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
