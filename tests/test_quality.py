"""Knowledge-quality metric against a plain float64 NumPy computation written from METHOD.md §1.2-1.3."""

import math

import numpy as np
import pytest
import torch

from pipeline.quality import layer_quality, select_layers
from pipeline.selection import choose_layers
from pipeline.errors import InputError


def numpy_quality(fa, ya, fb, yb, n_train, mode):
    """Straight from the formulas, with loops and explicit distances: shares no code with the pipeline."""
    fa, fb = fa.astype(np.float64), fb.astype(np.float64)
    classes = np.unique(ya)
    norms = np.sqrt((fa ** 2).sum(1))
    cos = fa @ fa.T / np.outer(norms, norms)
    if mode == "reference":
        cos = np.abs(cos)
    intra, min_intra, inter, dmin, class_norm = [], [], [], [], []
    for c in classes:
        idx = np.flatnonzero(ya == c)
        block = cos[np.ix_(idx, idx)]
        pairs = block[~np.eye(len(idx), dtype=bool)]
        intra.append(block.mean() if mode == "reference" else pairs.mean())
        min_intra.append(pairs.min())
        class_norm.append(norms[idx].mean())
        others = np.flatnonzero(ya != c)
        dmin.append(min(np.linalg.norm(fa[i] - fa[j]) for i in idx for j in others))
        for d in classes:
            if d != c:
                inter.append(cos[np.ix_(idx, np.flatnonzero(ya == d))].mean())
    S = np.mean(intra) - np.mean(inter)

    counts = [np.sum(yb == c) for c in np.unique(yb)]
    W = max(counts)
    P = np.zeros((len(counts), W))
    for row, c in enumerate(np.unique(yb)):
        x = fb[yb == c] - fb[yb == c].mean(0)
        s2 = np.linalg.svd(x, compute_uv=False) ** 2
        P[row, :len(s2)] = (s2 / s2.sum())[:W]
    m = []
    for p in P:
        cnt = 0
        while p[:cnt].sum() < 0.95 and cnt < W - 1:
            cnt += 1
        m.append(cnt)
    if mode == "reference":
        M, normaliser, r = min(sum(m), W), math.log(5), min(fa.shape)
    else:
        M, normaliser = max(1, round(np.mean(m))), math.log(W)
        r = np.linalg.matrix_rank(fa - fa.mean(0))
    q = P[:, :M].copy()
    q[q == 0] = np.float32(1e-127) if mode == "reference" else 1e-127  # the reference's spectra are float32: 0
    q /= q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        H = np.nan_to_num(-(q * np.log(q)).sum(1), nan=0.0)
    I = (1 - np.mean(min_intra)) * H.mean() / normaliser
    E = 2 * np.mean(dmin) / np.mean(class_norm) * (n_train / math.pi) ** (1 / r)
    return {"S": S, "I": I, "E": E, "Q": S + math.sqrt(I * E), "sqrtIE": math.sqrt(I * E), "M": M, "r": r}


def features(n_per_class, classes, dims, seed, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dims)) * 2
    labels = np.repeat(np.arange(classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dims)), labels


@pytest.mark.parametrize("mode", ["reference", "corrected"])
@pytest.mark.parametrize("dims, unequal", [(20, True), (4, True), (40, False)])  # D > or < class size (the other
def test_matches_numpy_formulas(mode, dims, unequal):  # spectrum branch); equal classes: no entropy zeroed
    fa, ya = features(8, 3, dims, seed=1)
    fb, yb = features(6, 3, dims, seed=2)
    if unequal:
        fb, yb = fb[:-1], yb[:-1]  # zero padding in the spectra: in reference mode, those classes' entropy is 0
        fa, ya = fa[2:], ya[2:]  # class means of unequal classes: their mean is not the mean over samples
    want = numpy_quality(fa, ya, fb, yb, n_train=1000, mode=mode)
    got = layer_quality(torch.from_numpy(fa), torch.from_numpy(ya), torch.from_numpy(fb), torch.from_numpy(yb),
                        n_train=1000, mode=mode).to_dict()
    for key in ("S", "I", "E", "Q", "sqrtIE"):
        assert got[key] == pytest.approx(want[key], abs=1e-6, rel=1e-6), key
    assert (got["M"], got["r"]) == (want["M"], want["r"])
    if not unequal:
        assert got["I"] > 0.1


def test_corrected_mode_gives_an_all_zero_feature_vector_cosine_0():
    fa, ya = features(8, 3, 20, seed=1)
    fa = np.maximum(fa, 0)  # post-ReLU features, one of them all zero
    fa[5] = 0
    got = layer_quality(torch.from_numpy(fa), torch.from_numpy(ya), torch.from_numpy(fa), torch.from_numpy(ya),
                        1000, "corrected").to_dict()
    norms = np.linalg.norm(fa, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    cos = fa @ fa.T / np.outer(safe, safe)
    same = (ya[:, None] == ya[None, :]) & ~np.eye(len(ya), dtype=bool)
    S = np.mean([cos[(ya[:, None] == c) & same].mean() for c in range(3)]) - np.mean(
        [cos[np.ix_(ya == c, ya == d)].mean() for c in range(3) for d in range(3) if c != d])
    assert all(math.isfinite(got[key]) for key in ("S", "I", "E", "Q"))
    assert got["S"] == pytest.approx(S, rel=1e-9)


def test_modes_differ_where_the_quirks_bite():
    fa, ya = features(8, 3, 20, seed=1)
    ref = layer_quality(torch.from_numpy(fa), torch.from_numpy(ya), torch.from_numpy(fa), torch.from_numpy(ya),
                        1000, "reference")
    cor = layer_quality(torch.from_numpy(fa), torch.from_numpy(ya), torch.from_numpy(fa), torch.from_numpy(ya),
                        1000, "corrected")
    assert ref.r == 20 and cor.r == 20  # 24 centred points in 20 dims: full rank either way
    assert ref.S != pytest.approx(cor.S) and ref.I != pytest.approx(cor.I)


def test_separable_features_beat_shuffled_labels():
    fa, ya = features(40, 4, 32, seed=3, spread=0.5)
    fa = np.abs(fa)  # non-negative, like post-ReLU features
    shuffled = np.random.default_rng(0).permutation(ya)
    t = torch.from_numpy
    good = layer_quality(t(fa), t(ya), t(fa), t(ya), 5000)
    bad = layer_quality(t(fa), t(shuffled), t(fa), t(shuffled), 5000)
    assert good.S > bad.S + 0.05
    assert good.E > 2 * bad.E


def test_float32_close_to_float64():
    fa, ya = features(30, 3, 64, seed=4)
    t = torch.from_numpy
    a = layer_quality(t(fa), t(ya), t(fa), t(ya), 5000, dtype=torch.float64)
    b = layer_quality(t(fa).float(), t(ya), t(fa).float(), t(ya), 5000, dtype=torch.float32)
    for key in ("S", "I", "E", "Q"):
        assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-3)


def test_corrected_rank_in_float32_counts_small_singular_values():
    # a float32 Gram resolves singular values only to ~2 % of the largest: the rank came out 194 of 512 once
    rng = np.random.default_rng(5)
    basis = np.linalg.qr(rng.normal(size=(96, 96)))[0]
    fa = (rng.normal(size=(300, 96)) * np.logspace(0, -3, 96)) @ basis
    ya = np.arange(300) % 3
    want = np.linalg.matrix_rank(fa - fa.mean(0))
    t = torch.from_numpy
    got = layer_quality(t(fa).float(), t(ya), t(fa).float(), t(ya), 5000, "corrected", dtype=torch.float32)
    assert want == 96 and got.r == want


def _table(values, criterion="Q"):
    return [{"layer": i, criterion: v} for i, v in enumerate(values)]


def test_selection_top_k_sorted_by_depth():
    rows = _table([0.1, 0.9, 0.3, 0.8, 0.95, 0.2, 0.85])
    assert select_layers(rows, "Q", 4) == [1, 3, 4, 6]
    assert select_layers(_table([0.5, 0.5, 0.5], "S"), "S", 2) == [0, 1]  # ties keep the shallower layer
    assert choose_layers(rows, "Q", 2, None) == ([1, 4], "top-2 by Q")
    nan = float("nan")  # a score that is not a number is never chosen (sorting on it returned [0, 1] here)
    assert select_layers(_table([1.0, nan, 3.0, 2.0, 0.5]), "Q", 2) == [2, 3]
    with pytest.raises(InputError, match=r"^Q is not finite for teacher layers \[1, 2\]: fewer than 2 layers"):
        select_layers(_table([1.0, nan, nan]), "Q", 2)


def test_explicit_layers_override_and_are_validated():
    rows = _table([0.1] * 6)
    assert choose_layers(rows, "Q", 4, [5, 1, 3]) == ([1, 3, 5], "params")
    with pytest.raises(InputError, match=r"score.layers \[6\] out of range: the teacher has 6 layers"):
        choose_layers(rows, "Q", 4, [1, 6])
    with pytest.raises(InputError, match="repeats a layer"):
        choose_layers(rows, "Q", 4, [1, 1])
    with pytest.raises(InputError, match="score.k is 7"):
        choose_layers(rows, "Q", 7, None)
