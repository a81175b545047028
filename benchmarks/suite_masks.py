"""The `masks` suite: `mcf_fast.masking.random_masks` (Philox + partial Fisher-Yates, both views in one
call) against MAE's recipe as the reference step states it (`mcf_fast.model.reference.mae_masking`:
torch.rand noise, two argsorts, the mask gathered back), for all V * N rows in one call, which
favours the baseline.

The baseline is fed x = the patch index itself ([V * N, L, 1]), so its gathered tokens are the kept
indices: it produces what `random_masks` produces (kept indices, inverse permutation, mask). Before
timing, `check` proves the two compute the same function: fed noise = our ids_restore, MAE's recipe
reproduces our ids_keep, ids_restore and mask bit for bit, and so does the pure-torch fallback.
"""
from __future__ import annotations

import torch

from . import harness as H
from .budget import Budget, BudgetSpent
from .rows import row, unmeasured

BASELINES = ("masks: the baseline is mcf_fast.model.reference.mae_masking (MAE's random_masking on torch.rand "
             "noise) over all views x rows in one call, fed the patch index as its token so it returns the kept indices.")


def _index_tokens(R: int, L: int, device) -> torch.Tensor:
    """[R, L, 1] float patch indices: MAE's gather of these tokens yields ids_keep (exact below 2^24)."""
    return torch.arange(L, dtype=torch.float32, device=device).expand(R, L).unsqueeze(-1)


def mae_masks(N, L, ratio, views, device, noise=None):
    """MAE's masks for V * N rows -> (ids_keep, ids_restore, mask bool) shaped [V, N, ...], via the reference."""
    from mcf_fast.model.reference import mae_masking
    R = views * N
    noise = torch.rand(R, L, device=device) if noise is None else noise
    kept, mask, ids_restore = mae_masking(_index_tokens(R, L, device), ratio, noise)
    return kept[..., 0].long().reshape(views, N, -1), ids_restore.reshape(views, N, L), mask.bool().reshape(views, N, L)


def providers(N, L, ratio, views, device, fallback=False) -> dict:
    """name -> (zero-argument callable, is_baseline); ours advances the step each call (fresh masks, as in training)."""
    from mcf_fast import masking as mk
    device = torch.device(device)
    backend = "extension" if mk._use_extension(device) else "torch fallback"
    from mcf_fast.model.reference import mae_masking
    ids, step, tokens = torch.arange(N, device=device), [0], _index_tokens(views * N, L, device)

    def ours():
        step[0] += 1
        return mk.random_masks(N, L, ratio, views=views, seed=0, step=step[0], sample_ids=ids, device=device)
    # the baseline as MAE runs it: no conversion of its outputs to ours' dtypes inside the timed call
    out = {"MAE torch.rand+argsort": (lambda: mae_masking(tokens, ratio, torch.rand(views * N, L, device=device)), True),
           f"mcf_fast[{backend}]": (ours, False)}
    if fallback:
        out["mcf_fast[torch fallback]"] = (lambda: mk._random_masks_torch(ids.cpu(), L, mk.num_kept(L, ratio), views,
                                                                          0, 1), False)
    return out


def check(N, L, ratio, views, device="cpu") -> None:
    """ours (on `device`) == the torch fallback == MAE's recipe fed our noise, bit for bit."""
    from mcf_fast import masking as mk
    ours = mk.random_masks(N, L, ratio, views=views, seed=0, step=1, device=device)
    fallback = mk._random_masks_torch(torch.arange(N), L, mk.num_kept(L, ratio), views, 0, 1)
    noise = ours.ids_restore.reshape(views * N, L).double()  # argsort(noise) = our ids_shuffle
    mae = mae_masks(N, L, ratio, views, ours.ids_keep.device, noise=noise)
    got = tuple(t.cpu() for t in ours)
    H.check_equal(f"random masks N={N} L={L}: torch fallback", got, tuple(fallback))
    H.check_equal(f"random masks N={N} L={L}: MAE's recipe fed our noise", got, tuple(t.cpu() for t in mae))


def run(device: torch.device, quick: bool, budget: Budget) -> list[dict]:
    shapes = [(256, 196)] if quick else [(256, 196), (1024, 196), (256, 784)]
    reps, warm = (10, 2) if quick else (40, 3)
    ratio, views = 0.75, 2
    rows = []
    for N, L in shapes:
        shape = f"N={N} L={L} r={ratio}"
        provs = providers(N, L, ratio, views, device, fallback=device.type == "cpu" and not quick)
        try:
            if not budget.spent():
                check(N, L, ratio, views, device)
        except H.ProviderMismatch as e:  # this shape's row says so; the other shapes still run
            rows.append(row("masks", "random masks, 2 views", shape, "int64", "provider check", note=f"FAILED: {e}"))
            continue
        # the torch fallback is ~100x slower than the extension: a few repeats of it, on its own
        for group, n in (([k for k in provs if "fallback" not in k], reps), ([k for k in provs if "fallback" in k],
                                                                             max(3, reps // 10))):
            try:
                if budget.spent():
                    raise BudgetSpent("the suite's share of the budget was spent before this shape")
                samples = H.measure({k: provs[k][0] for k in group}, warmup=min(warm, n), reps=n, device=device,
                                    budget=budget, extra_calls=1) if group else {}
            except BudgetSpent as e:
                rows += unmeasured("masks", "random masks, 2 views", shape, "int64", [(k, provs[k][1]) for k in group],
                                   budget.skip(f"masks {shape} {', '.join(group)}", str(e)))
                continue
            rows += [row("masks", "random masks, 2 views", shape, "int64", k, is_baseline=provs[k][1],
                         stats=H.summarize(samples[k]), peak_bytes=H.peak_bytes(provs[k][0], device)) for k in group]
    if device.type != "cuda":
        rows.append(row("masks", "random masks, 2 views", "as above", "int64", "mcf_fast[cuda]", note=H.NO_GPU))
    return rows


__all__ = ["BASELINES", "mae_masks", "providers", "check", "run"]
