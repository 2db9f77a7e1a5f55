"""Knowledge quality of a feature layer (METHOD.md §1): Separation S, Information I, Efficiency E, Q = S + sqrt(I·E).

Two modes:
- "reference" reproduces the reference code AS CODED, quirks included;
- "corrected" fixes each quirk METHOD.md §8.5 names; every difference is marked `corrected:` below.
All statistics are computed from one Gram matrix of subset A (n x n) and per-class Gram matrices of subset B.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from pipeline.errors import InputError

CRITERIA = ("Q", "S", "I", "E", "sqrtIE")
VARIANCE_KEPT = 0.95


@dataclass
class LayerQuality:
    S: float
    I: float
    E: float
    Q: float
    sqrtIE: float
    mean_min_intra: float  # mean_c MinIntra_c
    mean_entropy: float    # mean_c H_c
    M: int                 # spectrum entries kept for the entropy
    r: int                 # rank used in K
    K: float

    def to_dict(self) -> dict:
        return asdict(self)


def _class_masks(labels: torch.Tensor) -> torch.Tensor:
    classes = torch.unique(labels)
    return labels[None, :] == classes[:, None]  # (C, n) bool


def separation_and_min_intra(cos: torch.Tensor, masks: torch.Tensor, mode: str) -> tuple[float, float]:
    """S = mean_c AvgIntra_c - mean_{c != c'} AvgInter_{c,c'}; also mean_c MinIntra_c (over pairs i != j)."""
    onehot = masks.to(cos.dtype)
    counts = onehot.sum(1)
    block_sums = onehot @ cos @ onehot.T  # (C, C) sums of every class block
    block_means = block_sums / (counts[:, None] * counts[None, :])
    if mode == "reference":
        intra = block_means.diagonal()  # diagonal (self-similarity) included, AS CODED
    else:  # corrected: mean over pairs i != j only
        self_sim = onehot @ cos.diagonal()
        intra = (block_sums.diagonal() - self_sim) / (counts * (counts - 1))
    n_classes = len(counts)
    off_diag = ~torch.eye(n_classes, dtype=torch.bool, device=cos.device)
    inter = block_means[off_diag].mean()
    eye = torch.eye(len(cos), dtype=torch.bool, device=cos.device)
    min_intra = torch.stack([cos[m][:, m].masked_fill(eye[m][:, m], math.inf).min() for m in masks])
    return (intra.mean() - inter).item(), min_intra.mean().item()


def efficiency_ratio(gram: torch.Tensor, norms: torch.Tensor, masks: torch.Tensor) -> float:
    """2 * mean_c dmin_c / mean_c Norm_c, dmin_c = smallest Euclidean distance from class c to another class."""
    sq = norms * norms
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).sqrt()
    dmin = torch.stack([dist[m][:, ~m].min() for m in masks])
    mean_norm = torch.stack([norms[m].mean() for m in masks]).mean()
    return (2 * dmin.mean() / mean_norm).item()


def class_spectra(feats_b: torch.Tensor, labels_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Explained-variance ratios of each centred class, descending, zero-padded to W = max class size: (C, W); and
    how many of each row are not padding, min(n_c, D) (what an SVD returns): (C,)."""
    masks = _class_masks(labels_b)
    width = int(masks.sum(1).max())
    out = torch.zeros(len(masks), width, dtype=feats_b.dtype, device=feats_b.device)
    for c, m in enumerate(masks):
        x = feats_b[m] - feats_b[m].mean(0)
        small = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # same non-zero eigenvalues, smaller side
        eig = torch.linalg.eigvalsh(small).clamp_min(0).flip(0)[:width]
        out[c, :len(eig)] = eig / eig.sum()
    return out, torch.minimum(masks.sum(1), torch.tensor(feats_b.shape[1])).to(out.device)


def information(spectra: torch.Tensor, lengths: torch.Tensor, mean_min_intra: float,
                mode: str) -> tuple[float, float, int]:
    """I = (1 - mean_c MinIntra_c) * mean_c H_c / normaliser; returns (I, mean entropy, M). `lengths`: the
    non-padding ratios of each row of `spectra` (`class_spectra`)."""
    width = spectra.shape[1]
    cum = spectra.cumsum(1)
    # m_c: fewest leading ratios whose sum reaches 95 %, capped at W - 1 (the reference's loop bound)
    m = ((cum < VARIANCE_KEPT).sum(1) + 1).clamp(max=width - 1)
    if mode == "reference":
        kept = min(int(m.sum()), width)  # SUM over classes, AS CODED
        normaliser = math.log(5)  # AS CODED (comment: capped at 500 samples/class)
    else:  # corrected: the mean class count, and the entropy of W equal ratios as the normaliser
        kept = max(1, round(m.float().mean().item()))
        normaliser = math.log(width)
    q = spectra[:, :kept].double()  # float64 so the 1e-127 guard below does not underflow to 0
    q = torch.where(q == 0, torch.full_like(q, 1e-127), q)
    q = q / q.sum(1, keepdim=True)
    entropy = -(q * q.log()).sum(1)
    entropy = torch.nan_to_num(entropy, nan=0.0)
    # the reference's float32 spectra underflow the guard: a padding zero among its M ratios is 0 * log 0 = NaN, set
    # to 0. Not copied: its SVD's own exact zeros (seen on CPU for classes with many all-zero channels), which depend
    # on the SVD backend; here a class's rank-deficient tail (the Gram's clamped zeros) keeps its entropy
    if mode == "reference":
        entropy[lengths.to(entropy.device) < kept] = 0.0
    mean_entropy = entropy.mean().item()
    return (1 - mean_min_intra) * mean_entropy / normaliser, mean_entropy, kept


def global_rank(feats_a: torch.Tensor, gram: torch.Tensor, mode: str) -> int:
    n, d = feats_a.shape
    if mode == "reference":
        return min(n, d)  # the code counts the entries of the uncentred spectrum, so r = min(n, D), AS CODED
    # corrected: numerical rank of the centred matrix, from its centred Gram in float64: a float32 Gram resolves
    # singular values only down to ~2 % of the largest (its rounding is ~eps * n of the largest eigenvalue)
    if gram.dtype != torch.float64:
        feats_a = feats_a.double()
        gram = feats_a @ feats_a.T
    centred = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
    eig = torch.linalg.eigvalsh(centred)
    tol = eig.max() * max(n, d) * torch.finfo(eig.dtype).eps
    return max(1, int((eig > tol).sum()))


def layer_quality(feats_a: torch.Tensor, labels_a: torch.Tensor, feats_b: torch.Tensor, labels_b: torch.Tensor,
                  n_train: int, mode: str = "reference", dtype: torch.dtype = torch.float64) -> LayerQuality:
    """Scores of one layer from flattened features of subsets A (n_A, D) and B (n_B, D)."""
    if mode not in ("reference", "corrected"):
        raise ValueError(f"mode must be reference or corrected, not {mode!r}")
    fa = feats_a.to(dtype)
    gram = fa @ fa.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    if mode == "reference":
        cos = (gram / (norms[:, None] * norms[None, :])).abs()  # absolute cosine, no epsilon, AS CODED
    else:  # corrected: signed cosine; an all-zero feature vector has cosine 0 with everything
        safe = norms.clamp_min(torch.finfo(dtype).tiny)
        cos = gram / safe[:, None] / safe[None, :]  # one division at a time: tiny * tiny underflows to 0/0
    masks = _class_masks(labels_a.to(fa.device))
    S, mean_min_intra = separation_and_min_intra(cos, masks, mode)
    del cos
    ratio = efficiency_ratio(gram, norms, masks)
    r = global_rank(fa, gram, mode)
    del gram
    K = (n_train / math.pi) ** (1 / r)
    E = ratio * K
    I, mean_entropy, M = information(*class_spectra(feats_b.to(dtype), labels_b.to(feats_b.device)),
                                     mean_min_intra, mode)
    sqrt_ie = math.sqrt(max(I * E, 0.0))
    return LayerQuality(S=S, I=I, E=E, Q=S + sqrt_ie, sqrtIE=sqrt_ie, mean_min_intra=mean_min_intra,
                        mean_entropy=mean_entropy, M=M, r=r, K=K)


def select_layers(scores: list[dict], criterion: str, k: int) -> list[int]:
    """The k layers with the highest `criterion`, sorted by depth (ties keep the shallower layer); a layer whose
    score is not a number (e.g. S of an all-zero feature in reference mode) is never chosen."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}")
    finite = [row for row in scores if math.isfinite(row[criterion])]
    if len(finite) < k:
        bad = [row["layer"] for row in scores if not math.isfinite(row[criterion])]
        raise InputError(f"{criterion} is not finite for teacher layers {bad}: fewer than {k} layers to choose "
                         f"from (name them in score.layers)")
    ranked = sorted(finite, key=lambda row: (-row[criterion], row["layer"]))
    return sorted(row["layer"] for row in ranked[:k])
