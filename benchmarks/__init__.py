"""mcf_fast's benchmarks: every speed and memory claim, measured against the baseline a user would run.

A package, run from the repository root (or anywhere `benchmarks` and `mcf_fast` import from):

    python -m benchmarks.run --suite all --device cpu --out bench_out     # the report (docs/performance.md)
    python -m benchmarks.device_check --out DIR                            # the GPU kit (docs/gpu/README.md)
    python -m benchmarks.bench_mae_step | bench_detect | memory_ckpt | eval_chain

Layout: `harness` (the one timing / memory / check path) and `budget` (the wall-clock budget every
suite checks); `suite_kernels`, `suite_masks`, `suite_data`, `suite_step` (+ `step_child`, the step
measured in a child process, and `flops`) declare providers whose baselines are the project's own
references (`mcf_fast.kernels.*_ref`, `mcf_fast.model.reference`); `rows`, `tables`, `charts` turn
rows into report.json / report.md / PNGs; `machine` says where the numbers come from.
Importing the package imports nothing heavy (no torch).
"""
