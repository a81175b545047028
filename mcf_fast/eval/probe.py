"""A seconds-long downstream check: linear probes on a frozen encoder's patch tokens.

Alignment: ridge regression from all patch tokens (flattened) to the 19 landmark coordinates,
scored as NME_diag (mean point error / face-box diagonal). Parsing: ridge regression from each
patch token to the one-hot labels of its p x p pixels, argmax per pixel, scored as the mean F1 over
the 10 foreground LaPa classes. Both on synthetic faces with exact labels (`mcf_fast.data.synthetic`),
drawn at the encoder's input size. The ridge penalty is picked on a validation split from a fixed
grid, the same way for every encoder, so a pre-trained and a random-init encoder are compared on
equal terms. No gradient descent: the result is a deterministic function of the encoder and the seed.

The full fine-tuning protocol is `python -m mcf_fast.eval`; this probe is what the demo can afford.
"""
from __future__ import annotations

import numpy as np
import torch

from mcf_fast.data.config import IMAGENET_MEAN, IMAGENET_STD

PROBE_SEED = 777  # the probe's faces are their own data set, never the pre-training one
LAMBDAS = tuple(10.0 ** k for k in range(-4, 4))  # x mean feature energy


def probe_faces(n: int, size: int, seed: int = PROBE_SEED):
    """(images [n, 3, S, S] normalised, landmarks [n, 19, 2] px, boxes [n, 4] (l, r, t, b), labels [n, S, S])."""
    from mcf_fast.data.synthetic import draw_face
    faces = [draw_face(seed, i, size) for i in range(n)]
    x = torch.from_numpy(np.stack([f.image for f in faces])).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x, np.stack([f.landmarks for f in faces]).astype(np.float64), np.stack([f.bbox for f in faces]),
            np.stack([f.parsing for f in faces]))


@torch.no_grad()
def patch_tokens(encoder, imgs: torch.Tensor, batch: int = 128) -> np.ndarray:
    """[N, L, D] final-norm patch tokens (CLS dropped) of the frozen encoder, float64."""
    encoder.eval()
    out = [encoder.forward_features(imgs[i:i + batch])[:, 1:].double().numpy() for i in range(0, len(imgs), batch)]
    return np.concatenate(out)


def _ridge_fit_select(X, Y, n_fit: int, score):
    """Ridge on X [n, d] -> Y [n, k]: pick the penalty on rows n_fit: by `score` (lower is better),
    refit on all rows; returns a predict function. Dual form when d > n (one eigen-decomposition)."""
    mu, sd = X.mean(0), X.std(0) + 1e-8
    Xs = (X - mu) / sd
    ym = Y.mean(0)
    scale = float((Xs ** 2).sum(1).mean())

    def solver(A, B):  # the Gram matrix once, then one small solve per penalty
        if A.shape[1] > A.shape[0]:
            K = A @ A.T
            return lambda lam: A.T @ np.linalg.solve(K + lam * scale * np.eye(len(A)), B)
        G, AB = A.T @ A, A.T @ B
        return lambda lam: np.linalg.solve(G + lam * scale * np.eye(A.shape[1]), AB)
    fit_part = solver(Xs[:n_fit], Y[:n_fit] - ym)
    best = min(LAMBDAS, key=lambda lam: score(Xs[n_fit:] @ fit_part(lam) + ym, n_fit))
    W = solver(Xs, Y - ym)(best)
    return lambda Xn: ((Xn - mu) / sd) @ W + ym


def _nme_diag(pred, pts, boxes) -> float:
    diag = np.hypot(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2])
    return float((np.linalg.norm(pred - pts, axis=-1).mean(-1) / diag).mean())


def _f1_mean(pred, lab, classes: int = 11) -> float:
    cm = np.bincount(lab.ravel() * classes + pred.ravel(), minlength=classes * classes).reshape(classes, classes)
    f1 = []
    for c in range(1, classes):  # foreground only, as LaPa's mean F1
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c].sum() - cm[c, c]
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def probe(encoder, n_train: int = 480, n_test: int = 240, seed: int = PROBE_SEED) -> dict:
    """{'nme_diag': lower is better, 'f1_mean': higher is better} of linear probes on `encoder`."""
    size, p = encoder.arch["img_size"], encoder.arch["patch_size"]
    n_fit = n_train * 3 // 4
    imgs, pts, boxes, labels = probe_faces(n_train + n_test, size, seed)
    tok = patch_tokens(encoder, imgs)                                         # [N, L, D]
    N, L, D = tok.shape
    tr, te = slice(0, n_train), slice(n_train, None)
    # alignment: all tokens -> 38 coordinates
    Xa, Ya = tok.reshape(N, L * D), pts.reshape(N, -1)
    predict = _ridge_fit_select(Xa[tr], Ya[tr], n_fit, lambda P, k: _nme_diag(
        P.reshape(-1, 19, 2), pts[k:n_train], boxes[k:n_train]))
    nme = _nme_diag(predict(Xa[te]).reshape(-1, 19, 2), pts[te], boxes[te])
    # parsing: each token -> one-hot of its p x p pixels
    g = size // p
    lab = labels.reshape(N, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(N, L, p * p)
    onehot = np.eye(11)[lab].reshape(N, L, p * p * 11)
    Xp, Yp = tok.reshape(N * L, D), onehot.reshape(N * L, -1)
    rows = slice(0, n_train * L)

    def parse_score(P, k):  # k counts rows of tokens here
        return -_f1_mean(P.reshape(-1, p * p, 11).argmax(-1), lab.reshape(N * L, p * p)[k:n_train * L])
    predict_p = _ridge_fit_select(Xp[rows], Yp[rows], n_fit * L, parse_score)
    pred_lab = predict_p(Xp[n_train * L:]).reshape(-1, p * p, 11).argmax(-1)
    f1 = _f1_mean(pred_lab, lab[te].reshape(-1, p * p))
    return {"nme_diag": nme, "f1_mean": f1}


def random_encoder(arch: dict, seed: int):
    """The same architecture with fresh weights (the from-scratch baseline), seeded."""
    from mcf_fast.model.vit import build_vit
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vit(arch)
