"""Statistical tests of mcf_fast.masking: every K-subset equally likely, independently per row.

Each test computes an exact chi-square statistic: for per-row feature vectors Z (keep indicators,
their pairwise products, or products across two rows) whose exact mean mu and second moment S
under uniform K-subsets are known in closed form, T = R (mean(Z) - mu)' Sigma^+ (mean(Z) - mu)
with Sigma = S - mu mu' is chi-square with rank(Sigma) degrees of freedom for large R. Thresholds
are the 1 - 1e-6 quantile, so a correct generator fails with probability 1e-6 per test and seed.
Each test also runs a deliberately broken generator and requires it to FAIL, which proves the test
has power: modulo-biased draws (the classic `rand() % n` with a narrow rand), a cyclic-window
generator (uniform per position, wrong pairs), and views that share their random stream.
"""
import itertools
import math

import pytest
import torch

from mcf_fast import mask_algo as algo
from mcf_fast import masking as mk

P_FAIL = 1e-6


def chi2_isf(p, df):
    """Upper quantile of chi-square (scipy if present, else Wilson-Hilferty, good to <1% here)."""
    try:
        from scipy.stats import chi2
        return float(chi2.isf(p, df))
    except ImportError:
        z = 4.753424308822899 if p == 1e-6 else None  # Phi^-1(1 - 1e-6)
        assert z is not None
        h = 2.0 / (9.0 * df)
        return df * (1.0 - h + z * math.sqrt(h)) ** 3


def mahalanobis(Z, mu, S):
    """(T, df) for rows Z [R, P] against exact mean mu [P] and second moment S [P, P]."""
    Z = Z.double()
    cov = S - torch.outer(mu, mu)
    evals, evecs = torch.linalg.eigh(cov)
    live = evals > 1e-9 * evals.max()
    dev = Z.mean(0) - mu
    proj = evecs[:, live].T @ dev
    return float(Z.shape[0] * (proj.square() / evals[live]).sum()), int(live.sum())


def falling(K, L, k):
    """P(k given positions are all kept) for a uniform K-subset of L."""
    return math.prod((K - i) / (L - i) for i in range(k))


def single_moments(L, K):
    mu = torch.full((L,), K / L, dtype=torch.float64)
    S = torch.full((L, L), falling(K, L, 2), dtype=torch.float64)
    S.fill_diagonal_(K / L)
    return mu, S


def kept(masks):
    """[V * N, L] float keep indicators."""
    return (~masks.mask).reshape(-1, masks.mask.shape[-1]).double()


def modulo_biased(bits):
    """The classic biased bounded draw: (top `bits` bits of x) % range, never rejecting."""
    def bounded(x, rng):
        return (x >> (32 - bits)) % rng, torch.ones_like(x, dtype=torch.bool)
    return bounded


def biased_masks(N, L, ratio, views, seed, bits):
    ids = torch.arange(N, dtype=torch.int64)
    return algo.uniform_masks(ids, L, mk.num_kept(L, ratio), views, seed, 0, bounded=modulo_biased(bits))


def window_masks(N, L, K, seed):
    """Keeps K cyclically consecutive positions from a uniform start: uniform per position only."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, L, (N, 1), generator=g)
    keep = (start + torch.arange(K)) % L
    mask = torch.ones(N, L, dtype=torch.bool).scatter_(1, keep, False)
    return mk.Masks(None, None, mask[None])


def position_stat(m, L, K):
    mu, S = single_moments(L, K)
    return mahalanobis(kept(m), mu, S)


def pair_stat(m, L, K):
    X = kept(m)
    pairs = list(itertools.combinations(range(L), 2))
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    Z = X[:, a] * X[:, b]
    union = torch.tensor([[len(set(p) | set(q)) for q in pairs] for p in pairs])
    f = torch.tensor([falling(K, L, k) for k in range(5)], dtype=torch.float64)
    return mahalanobis(Z, torch.full((len(pairs),), f[2].item(), dtype=torch.float64), f[union])


def cross_stat(X0, X1, L, K):
    """Independence of two rows: Z = X0 (x) X1 against the product of the single moments."""
    mu1, S1 = single_moments(L, K)
    Z = (X0[:, :, None] * X1[:, None, :]).reshape(X0.shape[0], -1)
    return mahalanobis(Z, torch.kron(mu1, mu1), torch.kron(S1, S1))


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("L,ratio", [(196, 0.75), (49, 0.25)])
def test_per_position_keep_frequency(L, ratio):
    """Every position is kept equally often (chi-square, exact covariance), over 20k rows."""
    K = mk.num_kept(L, ratio)
    T, df = position_stat(mk.random_masks(10_000, L, ratio, views=2, seed=11), L, K)
    assert df == L - 1
    assert T < chi2_isf(P_FAIL, df), (T, df)


def test_per_position_detects_modulo_bias():
    """The same test rejects a generator with an 8-bit modulo-biased draw."""
    L, ratio = 196, 0.75
    T, df = position_stat(biased_masks(10_000, L, ratio, 2, 11, bits=8), L, mk.num_kept(L, ratio))
    assert T > chi2_isf(P_FAIL, df), (T, df)


@pytest.mark.parametrize("L,ratio", [(16, 0.75), (12, 0.5)])
def test_pair_cooccurrence(L, ratio):
    """Every pair of positions is kept together equally often (all second moments), 40k rows."""
    K = mk.num_kept(L, ratio)
    T, df = pair_stat(mk.random_masks(20_000, L, ratio, views=2, seed=12), L, K)
    assert T < chi2_isf(P_FAIL, df), (T, df)


def test_pair_cooccurrence_detects_window_generator():
    """A generator that is uniform per position but keeps runs of neighbours fails the pair test."""
    L, K = 16, 4
    T, df = pair_stat(window_masks(40_000, L, K, seed=0), L, K)
    assert T > chi2_isf(P_FAIL, df), (T, df)


@pytest.mark.parametrize("L,K", [(6, 2), (7, 3), (5, 4)])
def test_whole_subset_distribution(L, K):
    """All C(L, K) kept sets are equally likely (multinomial chi-square over 30k rows)."""
    ratio = 1 - K / L - 1e-9  # int(L * (1 - ratio)) == K
    m = mk.random_masks(15_000, L, ratio, views=2, seed=13)
    assert m.ids_keep.shape[-1] == K
    counts = _subset_counts(m, L)
    n_sets = math.comb(L, K)
    assert counts.numel() == n_sets, "some kept set never appeared"
    expected = counts.sum() / n_sets
    T = float(((counts - expected) ** 2 / expected).sum())
    assert T < chi2_isf(P_FAIL, n_sets - 1), T


def test_whole_subset_distribution_detects_modulo_bias():
    """A 4-bit modulo-biased draw skews the subset distribution and fails that test."""
    L, K = 6, 2
    m = biased_masks(15_000, L, 1 - K / L - 1e-9, 2, 13, bits=4)
    counts = _subset_counts(m, L)
    n_sets = math.comb(L, K)
    counts = torch.cat([counts, torch.zeros(n_sets - counts.numel())])
    expected = counts.sum() / n_sets
    T = float(((counts - expected) ** 2 / expected).sum())
    assert T > chi2_isf(P_FAIL, n_sets - 1), T


def _subset_counts(m, L):
    code = (kept(m).long() << torch.arange(L)).sum(1)  # kept set as a bit pattern
    return torch.unique(code, return_counts=True)[1].double()


@pytest.mark.parametrize("what", ["view", "sample", "step"])
def test_rows_are_independent(what):
    """Views of a sample, neighbouring samples and consecutive steps give independent masks."""
    L, ratio, N = 16, 0.75, 20_000
    K = mk.num_kept(L, ratio)
    if what == "view":
        m = mk.random_masks(N, L, ratio, views=2, seed=14)
        X0, X1 = kept(mk.Masks(None, None, m.mask[:1])), kept(mk.Masks(None, None, m.mask[1:]))
    elif what == "sample":
        m = mk.random_masks(2 * N, L, ratio, seed=14)
        X = kept(m)
        X0, X1 = X[0::2], X[1::2]
    else:
        X0 = kept(mk.random_masks(N, L, ratio, seed=14, step=7))
        X1 = kept(mk.random_masks(N, L, ratio, seed=14, step=8))
    T, df = cross_stat(X0, X1, L, K)
    assert T < chi2_isf(P_FAIL, df), (T, df)


def test_independence_detects_shared_stream():
    """Two views drawn from one stream (a counter-layout bug) fail the independence test."""
    L, ratio, N = 16, 0.75, 20_000
    m = mk.random_masks(N, L, ratio, views=1, seed=14)
    X = kept(m)
    T, df = cross_stat(X, X, L, mk.num_kept(L, ratio))
    assert T > chi2_isf(P_FAIL, df), (T, df)
