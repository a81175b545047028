"""The `kernels` suite: each op of mcf_fast.kernels against its own reference, forward and forward+backward.

The baseline of every case is the project's one statement of MAE's formulation, called, never
re-stated here: `gather_visible_ref`, `scatter_to_full_ref`, `info_nce_ref` (mcf_fast.kernels) and
`mae_masking` (mcf_fast.model.reference, MAE's random_masking as the reference step runs it). Before
a case is timed its providers are checked against that reference: data movement bit-exact
(`torch.equal`), arithmetic and every gradient within a stated tolerance. A case is a `Case`: its
inputs from a seed, its reference, the op, which inputs take gradients; `cases()` lists them, and
tests/test_benchmarks_pytest.py times the same list under pytest-benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import harness as H
from .budget import Budget, BudgetSpent
from .rows import row, unmeasured

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
L, D, DD, RATIO = 196, 768, 512, 0.75  # ViT-B/16 at 224: 196 patches, 768-d encoder, 512-d decoder, MAE's ratio
T, SCALE, C = 0.2, 0.4, 256            # MCF's InfoNCE: temperature 0.2, scale 2T, 256-d projections


@dataclass(frozen=True)
class Case:
    """One op at one shape: `make(seed, device) -> (args, upstream grad)`; `wrt`: the args that take
    gradients; `exact`: the forward is data movement (bit-exact) rather than arithmetic."""
    op: str
    shape: str
    dtype: str
    make: Callable
    reference: Callable
    ours: Callable
    baseline: str
    wrt: tuple
    exact: bool

    def forward(self, fn, args):
        out = fn(*args)
        return out[0] if isinstance(out, tuple) else out  # random_masking: gradients flow through x_masked

    def backward(self, fn, args, g):
        return torch.autograd.grad(self.forward(fn, args), [args[i] for i in self.wrt], g)


def _perm(N, L, seed):
    """A random permutation per row (any permutation is a valid mask order for the ops)."""
    return torch.rand(N, L, generator=torch.Generator().manual_seed(seed)).argsort(1)


def cases(N: int = 256, dtypes=("fp32", "bf16"), nce_n: int = 4096) -> list[Case]:
    """The suite's cases at batch N: gather / scatter / random_masking per dtype, InfoNCE at nce_n x nce_n."""
    import mcf_fast.kernels as K

    from mcf_fast.model.reference import mae_masking
    kk = int(L * (1 - RATIO))
    out = []
    for name in dtypes:
        dt = _DT[name]

        def gather_in(s, dev, dt=dt):
            x = torch.randn(N, L, D, dtype=dt, device=dev, requires_grad=True)
            cls = torch.randn(1, 1, D, dtype=dt, device=dev, requires_grad=True)
            ids = _perm(N, L, s)[:, :kk].to(dev)
            return (x, ids, torch.randn(1 + L, D, dtype=dt, device=dev), cls), torch.randn(N, 1 + kk, D, dtype=dt,
                                                                                             device=dev)

        def scatter_in(s, dev, dt=dt):
            t = torch.randn(N, 1 + kk, DD, dtype=dt, device=dev, requires_grad=True)
            m = torch.randn(1, 1, DD, dtype=dt, device=dev, requires_grad=True)
            restore = _perm(N, L, s).argsort(1).to(dev)
            return (t, restore, m, torch.randn(1 + L, DD, dtype=dt, device=dev)), torch.randn(N, 1 + L, DD, dtype=dt,
                                                                                                device=dev)

        def masking_in(s, dev, dt=dt):
            x = torch.randn(N, L, D, dtype=dt, device=dev, requires_grad=True)
            noise = torch.rand(N, L, generator=torch.Generator().manual_seed(s)).to(dev)
            return (x, RATIO, noise), torch.randn(N, kk, D, dtype=dt, device=dev)

        out += [Case("gather_visible", f"N={N} L={L} D={D} r={RATIO}", name, gather_in, K.gather_visible_ref,
                     K.gather_visible, "gather_visible_ref", (0, 3), True),
                Case("scatter_to_full", f"N={N} L={L} Dd={DD} r={RATIO}", name, scatter_in, K.scatter_to_full_ref,
                     K.scatter_to_full, "scatter_to_full_ref", (0, 2), True),
                Case("random_masking", f"N={N} L={L} D={D} r={RATIO}", name, masking_in, mae_masking,
                     K.random_masking, "reference.mae_masking", (0,), True)]

    def nce_in(s, dev):
        g = torch.Generator().manual_seed(100 + s)
        q = torch.randn(nce_n, C, generator=g).to(dev).requires_grad_(True)
        return (q, torch.randn(nce_n, C, generator=g).to(dev), T, 0, SCALE), None
    out.append(Case("info_nce", f"N=M={nce_n} C={C}", "fp32", nce_in, K.info_nce_ref, K.info_nce, "info_nce_ref",
                    (0,), False))
    return out


def check(case: Case, args, g) -> None:
    """The op equals its reference before any timing: forward (bit-exact for data movement), then every gradient."""
    if case.exact:
        H.check_equal(f"{case.op} forward", case.ours(*args), case.reference(*args))
    else:
        H.check_close(f"{case.op} forward", case.ours(*args), case.reference(*args), rtol=1e-4, atol=1e-6)
    for x, y in zip(case.backward(case.ours, args, g), case.backward(case.reference, args, g)):
        # sums over N in another order: close, not bit-equal; atol scaled to the gradient (a sum's error grows
        # with its terms) and to the dtype
        tol = 1e-2 if case.dtype == "bf16" else 1e-5 if case.exact else 1e-4
        H.check_close(f"{case.op} backward", x.float(), y.float(), rtol=tol, atol=tol * float(y.abs().max()) + 1e-12)


def pool(case: Case, device, n: int = 3) -> Callable[[], tuple]:
    """Fresh inputs per call without paying their generation inside the timed region: `n` distinct
    input sets, handed out in turn."""
    sets, i = [case.make(s, device) for s in range(n)], [0]

    def setup():
        i[0] += 1
        return sets[i[0] % n]
    return setup


def calls(case: Case, fn) -> dict[str, Callable]:
    """The two timed modes of a provider: forward under no_grad, and forward + backward."""
    def fwd(args, g):
        with torch.no_grad():
            fn(*args)
    return {"fwd": fwd, "fwd+bwd": lambda args, g: case.backward(fn, args, g)}


def run(device: torch.device, quick: bool, budget: Budget) -> list[dict]:
    """Rows of every case, mode and provider; a case that does not fit in `budget` says so."""
    import mcf_fast.kernels as K
    K.set_backend("auto")
    ours = "mcf_fast[triton]" if device.type == "cuda" else "mcf_fast[cpu]"
    reps, warm = (5, 1) if quick else (10, 1)
    todo = cases(32, ("fp32",), 1024) if quick else cases()
    rows = []
    for case in todo:
        setup = pool(case, device) if not budget.spent() else None
        try:
            if setup is not None:
                check(case, *setup())
        except H.ProviderMismatch as e:  # this case's rows say so; the other cases still run
            rows += unmeasured("kernels", f"{case.op} check", case.shape, case.dtype, [(ours, False)], f"FAILED: {e}")
            continue
        for mode in ("fwd", "fwd+bwd"):
            provs = {case.baseline: calls(case, case.reference)[mode], ours: calls(case, case.ours)[mode]}
            what = f"{case.op} {mode}"
            try:
                if setup is None:
                    raise BudgetSpent("the suite's share of the budget was spent before this case")
                samples = H.measure(provs, setup, warmup=warm, reps=reps, device=device, budget=budget, extra_calls=1)
            except BudgetSpent as e:
                rows += unmeasured("kernels", what, case.shape, case.dtype, [(case.baseline, True), (ours, False)],
                                   budget.skip(f"kernels {what} {case.shape} {case.dtype}", str(e)))
                continue
            for name, fn in provs.items():
                args = setup()
                rows.append(row("kernels", what, case.shape, case.dtype, name, is_baseline=name == case.baseline,
                                stats=H.summarize(samples[name]), peak_bytes=H.peak_bytes(lambda: fn(*args), device)))
    if device.type != "cuda":
        rows.append(row("kernels", "gather/scatter/info_nce", "as above", "bf16", "mcf_fast[triton]", note=H.NO_GPU))
    return rows


BASELINES = ("kernels: the baseline of each op is its reference, called as the package states it: "
             "gather_visible_ref (x + pos over all L, gather with an expanded index, cat CLS), scatter_to_full_ref "
             "(cat mask tokens, gather, cat CLS, + pos), mcf_fast.model.reference.mae_masking (MAE's random_masking: "
             "two argsorts, a gather with a repeated index, the mask gathered back), info_nce_ref (full logits + "
             "cross_entropy).")

__all__ = ["BASELINES", "Case", "cases", "check", "pool", "calls", "run"]
