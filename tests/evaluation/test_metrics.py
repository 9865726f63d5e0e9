"""Tests for plmetric.evaluation.metrics: exact retrieval metrics, tie rule, backends, embedding a data set."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from numerics import assert_within, function_error, gamma, u
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plmetric.evaluation import metrics as evaluation
from plmetric.evaluation.metrics import embed_dataset, evaluate, map_at_r, nearest_neighbors, nmi, r_precision, recall_at_k

try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False

BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed"))]


# ----------------------------------------------------------------------------- NumPy float64 reference


def reference_scores(x: np.ndarray, metric: str) -> np.ndarray:
    """Full score matrix (cosine similarity or negated squared distance), -inf on the diagonal."""
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        score = x @ x.T
    else:
        score = -((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(score, -np.inf)
    return score


def reference_order(x: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, neighbour order): each row's other points by score descending, ties by index."""
    score = reference_scores(x, metric)
    n = len(score)
    index = np.broadcast_to(np.arange(n), (n, n))
    order = np.lexsort((index, -score), axis=-1)[:, : n - 1]  # the query itself (-inf) is last
    return score, order


def reference_metrics(x: np.ndarray, y: np.ndarray, ks, metric: str = "cosine") -> dict[str, float]:
    """Recall@K, MAP@R and R-precision straight from the definitions."""
    _, order = reference_order(x, metric)
    same = y[order] == y[:, None]
    num_relevant = np.bincount(y)[y] - 1
    out = {f"recall@{k}": float(same[:, :k].any(1).mean()) for k in ks}
    average_precisions, r_precisions = [], []
    for row, r in zip(same, num_relevant, strict=True):
        if r == 0:
            continue
        relevant = row[:r].astype(np.float64)
        precision_at = np.cumsum(relevant) / np.arange(1, r + 1)
        average_precisions.append((relevant * precision_at).sum() / r)
        r_precisions.append(relevant.sum() / r)
    out["map@r"] = float(np.mean(average_precisions)) if average_precisions else float("nan")
    out["r_precision"] = float(np.mean(r_precisions)) if r_precisions else float("nan")
    return out


def tied_data(metric: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points drawn from a few atoms (exact duplicates, many tied scores), computed exactly in float32.

    cosine: unit vectors with four entries of ±0.5 (norm exactly 1, dot products multiples of 1/4);
    euclidean: small integer vectors (exact squared distances).
    """
    rng = np.random.default_rng(seed)
    if metric == "cosine":
        atoms = np.zeros((7, 8), dtype=np.float32)
        for atom in atoms:
            atom[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    else:
        atoms = rng.integers(-2, 3, (7, 5)).astype(np.float32)
    x = atoms[rng.integers(0, len(atoms), n)]
    y = rng.integers(0, 6, n)
    return x, y


def sized_labels(rng: np.random.Generator, sizes) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(len(sizes)), sizes))


def metric_error(n: int) -> float:
    """|ours - reference| for a retrieval metric of n queries computed from the same ranking.

    Counts are exact integers; recall@K is a mean of n 0/1 values (γ_{n+1}); AP@R_i sums <= n - 1
    precisions (each a division, u) and divides by R_i, MAP@R and R-precision average n of them:
    a chain of at most 2n + 3 roundings on values in [0, 1], on each side: ``2 γ_{2n+3}``.
    """
    return 2 * gamma(2 * n + 3)


def score_error(x: np.ndarray, metric: str, dtype) -> np.ndarray:
    """Bound (N, N) on a ranking score's error in ``dtype`` against exact arithmetic on the values x.

    cosine: two normalisations (γ_{d+3} per entry of a unit row) and a dot product of unit rows
    (γ_d): ``γ_{2d+6}``; euclidean ``-(‖a‖² + ‖b‖² - 2a·b)``: ``γ_{d+2} (‖a‖ + ‖b‖)²``.
    """
    n, d = x.shape
    if metric == "cosine":
        return np.full((n, n), gamma(2 * d + 6, dtype))
    norms = np.linalg.norm(x, axis=1)
    return gamma(d + 2, dtype) * (norms[:, None] + norms[None, :]) ** 2


def unstable_queries(
    score: np.ndarray, y: np.ndarray, err: np.ndarray, err_ref: np.ndarray, depth: np.ndarray | None = None
) -> np.ndarray:
    """(N,) bool: queries whose metrics rounding could change.

    The metrics depend on the ranking only through the sequence of relevant / irrelevant
    neighbours in the first ``depth_i`` ranks (all by default). ``score`` is a reference within
    ``err_ref`` of the exact scores; the implementations compared are within ``err``. Where every
    change of relevance in a row sorted by ``score`` is a gap larger than the errors of its two
    items on both counts, every such implementation reproduces the exact relevance sequence.
    """
    n = len(score)
    depth = np.full(n, n - 1) if depth is None else np.broadcast_to(depth, (n,))
    unstable = np.zeros(n, dtype=bool)
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        order = others[np.argsort(-score[i, others], kind="stable")]
        relevant = y[order] == y[i]
        change = (relevant[1:] != relevant[:-1]) & (np.arange(n - 2) < depth[i])
        gaps = score[i, order[:-1]] - score[i, order[1:]]
        limit = (err + err_ref)[i, order[:-1]] + (err + err_ref)[i, order[1:]]
        unstable[i] = (gaps[change] <= limit[change]).any()
    return unstable


def assert_relevance_order_stable(*args, **kwargs) -> None:
    """No query's metrics depend on rounding (:func:`unstable_queries`)."""
    unstable = unstable_queries(*args, **kwargs)
    assert not unstable.any(), f"queries {np.flatnonzero(unstable)}: a relevance change within rounding"


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 39, 40, 100, None])
def test_matches_reference_with_ties_and_duplicates(metric, chunk_size, backend):
    x, y = tied_data(metric, n=40, seed=7)
    score, order = reference_order(x, metric)
    finite = score[np.isfinite(score)]
    assert len(np.unique(finite)) < len(finite) // 10, "the data must be full of ties"
    assert len(np.unique(x, axis=0)) < len(x), "the data must contain exact duplicates"

    ks = (1, 2, 5, 39, 1000)
    got = evaluate(
        torch.from_numpy(x),
        torch.from_numpy(y),
        ks,
        chunk_size=chunk_size,
        backend=backend,
        compute_nmi=False,
        metric=metric,
    )
    want = reference_metrics(x, y, ks, metric)
    for key, value in want.items():
        assert abs(got[key] - value) <= metric_error(len(y)), key  # the same ranking (exact scores)

    values, indices = nearest_neighbors(torch.from_numpy(x), 12, chunk_size=chunk_size, backend=backend, metric=metric)
    np.testing.assert_array_equal(indices.numpy(), order[:, :12])
    want_values = np.take_along_axis(score, order[:, :12], 1)
    want_values = want_values if metric == "cosine" else -np.sqrt(-want_values)
    # the scores are exact in float32 (tied_data); only the euclidean float32 square root rounds
    assert_within(values, want_values, u(torch.float32) * np.abs(want_values), "neighbour values")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [7, 64, None])
def test_continuous_data_matches_reference(metric, chunk_size):
    rng = np.random.default_rng(3)
    y = sized_labels(rng, rng.integers(1, 12, 40))  # includes classes of one item
    x = rng.standard_normal((len(y), 6)) + 1.5 * rng.standard_normal((40, 6))[y]
    ks = (1, 3, 10, 50)
    got = evaluate(
        torch.from_numpy(x), torch.from_numpy(y), ks, chunk_size=chunk_size, compute_nmi=False, metric=metric
    )
    want = reference_metrics(x, y, ks, metric)
    # float64 scores on both sides: the same ranking where relevance changes are clear gaps
    err = score_error(x, metric, torch.float64)
    assert_relevance_order_stable(reference_scores(x, metric), y, err, err)
    for key, value in want.items():
        assert abs(got[key] - value) <= metric_error(len(y)), key
    assert 0.2 < got["recall@1"] < 0.95, "a data set where ranking matters"
    options = dict(chunk_size=chunk_size, metric=metric)
    assert recall_at_k(torch.from_numpy(x), torch.from_numpy(y), ks, **options) == {
        f"recall@{k}": got[f"recall@{k}"] for k in ks
    }
    assert map_at_r(torch.from_numpy(x), torch.from_numpy(y), **options) == got["map@r"]
    assert r_precision(torch.from_numpy(x), torch.from_numpy(y), **options) == got["r_precision"]
    assert got["num_images"] == len(y) and got["num_classes"] == 40


def test_query_is_excluded_by_index_not_by_position():
    # Points 0-2 coincide; 0 is labelled 0, 1 and 2 are labelled 1. Point 3 (label 0) is elsewhere.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    y = torch.tensor([0, 1, 1, 0])
    values, indices = nearest_neighbors(x, 3)
    # ties at similarity 1 go to the lower index; the query never appears in its own list
    assert indices.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert values[:, 0].tolist()[:3] == [1.0, 1.0, 1.0]  # unit vectors (1, 0): exact
    # cos = 0.6 for the float32 data (0.6, 0.8), (1, 0): the inputs' rounding (u) and the score (γ_{2d+6})
    assert abs(values[3, 0].item() - 0.6) <= u(torch.float32) + gamma(2 * 2 + 6, torch.float32)
    # R@1: query 0 -> 1 (miss), 1 -> 0 (miss), 2 -> 0 (miss), 3 -> 0 (hit). Dropping the first
    # column of a list that includes the query would instead give 1 -> 2 (hit) for one tie order.
    for backend in ["torch", "faiss"] if HAVE_FAISS else ["torch"]:
        for chunk_size in (1, 2, None):
            metrics = evaluate(x, y, (1, 2, 3), backend=backend, chunk_size=chunk_size, compute_nmi=False)
            assert metrics["recall@1"] == 0.25
            assert metrics["recall@2"] == 0.75
            assert metrics["recall@3"] == 1.0
            # R_i = 1 for every query: AP@R = R-precision = hit at rank 1
            assert metrics["map@r"] == metrics["r_precision"] == 0.25
            want = reference_metrics(x.numpy(), y.numpy(), (1, 2, 3))
            assert {k: metrics[k] for k in want} == want


def test_identical_points_are_ranked_by_index():
    x = torch.ones(6, 3)
    _, indices = nearest_neighbors(x, 5, chunk_size=4)
    assert indices.tolist() == [[j for j in range(6) if j != i] for i in range(6)]


def test_euclidean_values_are_negated_distances():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    values, indices = nearest_neighbors(x, 2, metric="euclidean")
    assert indices.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    assert values.tolist() == [[-1.0, -3.0], [-1.0, -2.0], [-2.0, -3.0], [-4.0, -6.0]]


def test_float64_input_is_computed_in_float64():
    x = torch.randn(30, 4, dtype=torch.float64)
    values, indices = nearest_neighbors(x, 3)
    assert values.dtype == torch.float64 and indices.dtype == torch.int64


# ----------------------------------------------------------------------------- against other implementations


def test_matches_pytorch_metric_learning():
    pml_acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    rng = np.random.default_rng(11)
    y = sized_labels(rng, rng.integers(2, 10, 60))  # no class of one item
    x = rng.standard_normal((len(y), 24)).astype(np.float32) + 0.6 * rng.standard_normal((60, 24)).astype(np.float32)[y]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    calculator = pml_acc.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),  # inner product of normalised rows, like ours
    )
    theirs = calculator.get_accuracy(x, y, x, y, ref_includes_query=True)
    ours = evaluate(x, y, (1,), compute_nmi=False)
    assert 0.2 < ours["recall@1"] < 0.95
    # Both rank by float32 cosine scores (score_error each) and compute the metrics in float64
    # (metric_error): equal up to that where the relevance order is stable.
    # (recall@1 needs rank 1, MAP@R and R-precision the first R_i ranks)
    xd, yn = x.double().numpy(), y.numpy()
    depth = np.maximum(np.bincount(yn)[yn] - 1, 1)
    errors = score_error(xd, "cosine", torch.float32), score_error(xd, "cosine", torch.float64)
    assert_relevance_order_stable(reference_scores(xd, "cosine"), yn, *errors, depth)
    bound = metric_error(len(y))
    assert abs(ours["recall@1"] - theirs["precision_at_1"]) <= bound
    assert abs(ours["map@r"] - theirs["mean_average_precision_at_r"]) <= bound
    assert abs(ours["r_precision"] - theirs["r_precision"]) <= bound

    # With classes of one item, pml drops those queries from precision_at_1; we count them as misses.
    y_singletons = y.clone()
    y_singletons[:25] = torch.arange(1000, 1025)
    theirs = calculator.get_accuracy(x, y_singletons, x, y_singletons, ref_includes_query=True)
    ours = evaluate(x, y_singletons, (1,), compute_nmi=False)
    has_positive = (torch.bincount(y_singletons)[y_singletons] > 1).sum().item()
    # the rescaling adds two roundings (2u) on a value <= N / has_positive
    rescaled = ours["recall@1"] * len(y) / has_positive
    assert abs(rescaled - theirs["precision_at_1"]) <= bound * len(y) / has_positive + 2 * u() * rescaled
    assert abs(ours["map@r"] - theirs["mean_average_precision_at_r"]) <= bound
    assert abs(ours["r_precision"] - theirs["r_precision"]) <= bound


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_faiss_and_torch_agree(metric):
    rng = np.random.default_rng(5)
    y = sized_labels(rng, rng.integers(1, 9, 120))
    centres = rng.standard_normal((120, 32)).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((len(y), 32)).astype(np.float32) + centres[y])
    ks = (1, 2, 4, 8, 16, 100)
    by_torch = evaluate(x, torch.from_numpy(y), ks, backend="torch", compute_nmi=False, metric=metric)
    by_faiss = evaluate(x, torch.from_numpy(y), ks, backend="faiss", compute_nmi=False, metric=metric)
    # Both rank by float32 scores within score_error of the exact ones: the metrics agree within
    # metric_error, plus 1/(queries) for every query whose relevance order rounding could change
    # (unstable_queries; the worst-case bound admits a few here, which agree in practice)
    xd = x.double().numpy()
    err = score_error(xd, metric, torch.float32)
    score, errors = reference_scores(xd, metric), (err, score_error(xd, metric, torch.float64))
    # a query whose relevance sequence rounding can change moves a mean by <= 1 / (queries)
    for k in ks:
        flips = unstable_queries(score, y, *errors, depth=np.full(len(y), k)).sum()
        assert abs(by_faiss[f"recall@{k}"] - by_torch[f"recall@{k}"]) <= flips / len(y) + metric_error(len(y))
    num_relevant = np.bincount(y)[y] - 1
    valid = (num_relevant > 0).sum()
    flips = unstable_queries(score, y, *errors, depth=np.maximum(num_relevant, 1))[num_relevant > 0].sum()
    assert flips <= 0.05 * valid, "the data must leave most rankings to the data, not to rounding"
    assert abs(by_faiss["map@r"] - by_torch["map@r"]) <= flips / valid + metric_error(len(y))
    assert abs(by_faiss["r_precision"] - by_torch["r_precision"]) <= flips / valid + metric_error(len(y))
    v_torch, i_torch = nearest_neighbors(x, 20, backend="torch", metric=metric)
    v_faiss, i_faiss = nearest_neighbors(x, 20, backend="faiss", metric=metric)
    # values: two scores within 2·err of each other; the euclidean value -sqrt(max(-score, 0))
    # turns a score error δ into <= min(sqrt(δ), δ / |value|), plus the float32 square root (u)
    delta = 2 * float(err.max())
    magnitude = v_torch.double().abs()
    if metric == "cosine":
        value_err = torch.full_like(magnitude, delta)
    else:
        value_err = torch.minimum(torch.full_like(magnitude, math.sqrt(delta)), delta / magnitude)
        value_err = value_err + 2 * u(torch.float32) * magnitude
    assert_within(v_faiss, v_torch, value_err, "faiss vs torch values")
    # the two libraries round dot products differently: orders may differ only between near-ties,
    # two items whose exact scores are within 2·err, i.e. values within 2·value_err
    rows, cols = (i_faiss != i_torch).nonzero(as_tuple=True)
    assert len(rows) <= 0.01 * i_torch.numel()
    values = v_torch.double()
    gap_before = (values[rows, cols] - values[rows, (cols - 1).clamp(min=0)]).abs()
    gap_after = (values[rows, cols] - values[rows, (cols + 1).clamp(max=19)]).abs()
    near = 4 * value_err[rows, cols]
    assert bool((torch.minimum(gap_before.where(cols > 0, 1.0), gap_after.where(cols < 19, 1.0)) <= near).all())


# ----------------------------------------------------------------------------- NMI


def test_nmi_perfect_clusters_and_shuffled_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 40)
    centres = np.eye(8)[:5] * 10
    x = torch.from_numpy(centres[labels] + 0.1 * rng.standard_normal((200, 8)))
    # NMI = MI / mean(H) = 1 exactly for a perfect clustering; sklearn's float64 MI and entropies
    # are sums of K = 5 terms, each a product of a ratio and <= 3 logs of counts <= N (4 function
    # errors and 6 roundings on values <= 3 log N + 1), divided by H = log K: relative error
    # <= 2 K (4 f + 6 u) (3 log N + 1) / log K for each of MI and H
    k, n = 5, 200
    bound = 4 * k * (4 * function_error() + 6 * u()) * (3 * math.log(n) + 1) / math.log(k)
    assert abs(nmi(x, torch.from_numpy(labels)) - 1.0) <= bound
    assert nmi(x, torch.from_numpy(rng.permutation(labels))) < 0.1
    metrics = evaluate(x, torch.from_numpy(labels), (1,))
    assert abs(metrics["nmi"] - 1.0) <= bound
    assert "nmi" not in evaluate(x, torch.from_numpy(labels), (1,), compute_nmi=False)


# ----------------------------------------------------------------------------- memory bound


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any torch operation returns, and every matrix product's shape."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.products: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "matmul", "bmm"):
            self.products.append(tuple(out.shape))
        return out


def test_torch_path_never_holds_an_n_by_n_matrix():
    rng = np.random.default_rng(1)
    n, chunk = 600, 16
    y = sized_labels(rng, rng.integers(2, 12, 100))[:n]
    x = torch.from_numpy(rng.standard_normal((len(y), 8)).astype(np.float32))
    y = torch.from_numpy(y)
    n = len(y)

    with LargestTensor() as record:
        nearest_neighbors(x, 5, chunk_size=chunk)
    assert record.products and all(rows <= chunk for rows, _ in record.products)
    assert record.largest <= chunk * n

    for metric in ("cosine", "euclidean"):
        with LargestTensor() as record:
            evaluate(x, y, (1, 10, 100), chunk_size=chunk, compute_nmi=False, metric=metric)
        # blocks are about `chunk` rows, widened to whole classes (at most 11 more)
        assert record.products and all(r <= chunk and c < chunk + 12 for r, c in record.products)
        assert record.largest <= 20 * n  # O(N × largest class), never O(N²)


# ----------------------------------------------------------------------------- embed_dataset


class TinyDataset(torch.utils.data.Dataset):
    """Items (image, label, index); the items listed in ``unreadable`` are None."""

    def __init__(self, n: int, unreadable: set[int]):
        self.images = torch.arange(n * 3, dtype=torch.float32).view(n, 3) / 10
        self.unreadable = unreadable

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        if i in self.unreadable:
            return None
        return self.images[i], 100 + i % 4, i


class ModeRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.dropout = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, images):
        self.modes.append(self.training)
        return self.dropout(self.linear(images)).double()


@pytest.mark.parametrize("training", [True, False])
def test_embed_dataset_order_skipping_and_mode(training):
    dataset = TinyDataset(11, unreadable={1, 3, 4, 5})  # with batch_size 3, batch [3, 4, 5] is empty
    model = ModeRecorder().train(training)
    embeddings, labels, indices = embed_dataset(model, dataset, batch_size=3, progress=True)
    readable = [i for i in range(11) if i not in dataset.unreadable]
    assert indices.tolist() == readable
    assert labels.tolist() == [100 + i % 4 for i in readable]
    assert embeddings.dtype == torch.float32 and labels.dtype == indices.dtype == torch.int64
    assert embeddings.device.type == "cpu"
    with torch.no_grad():
        images = dataset.images[readable]
        expected = model.linear(images)
        # eval mode: dropout off; batches of 3 vs one batch may take different float32 kernels,
        # each within γ_{d+1} (|x| |W|ᵀ + |b|) of the exact affine map (d = 3 inputs)
        scale = images.abs() @ model.linear.weight.abs().T + model.linear.bias.abs()
    assert_within(embeddings, expected, 2 * gamma(3 + 1, torch.float32) * scale, "embeddings")
    assert model.modes and not any(model.modes)
    assert model.training == training


def test_embed_dataset_all_unreadable_and_bad_model():
    model = ModeRecorder()
    embeddings, labels, indices = embed_dataset(model, TinyDataset(4, unreadable={0, 1, 2, 3}), batch_size=2)
    assert embeddings.shape == (0, 0) and labels.shape == indices.shape == (0,)

    class TupleModel(nn.Module):
        def forward(self, images):
            return images, images

    tuple_model = TupleModel().train()
    with pytest.raises(ValueError, match="must return a"):
        embed_dataset(tuple_model, TinyDataset(4, unreadable=set()))
    assert tuple_model.training
    with pytest.raises(ValueError, match="batch_size"):
        embed_dataset(model, TinyDataset(4, unreadable=set()), batch_size=0)


# ----------------------------------------------------------------------------- bad input


GOOD_X = torch.randn(6, 3)
GOOD_Y = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: evaluate(GOOD_X, torch.tensor([0, 0, 1, 1, 2, -1])), "unlabelled"),
        (lambda: evaluate(GOOD_X, GOOD_Y[:5]), "5 labels for 6 embeddings"),
        (lambda: evaluate(GOOD_X[:1], GOOD_Y[:1]), "at least 2"),
        (lambda: evaluate(torch.tensor([[0.0, float("nan")]] * 3), GOOD_Y[:3]), "NaN"),
        (lambda: recall_at_k(torch.tensor([[0.0, float("inf")]] * 3), GOOD_Y[:3]), "NaN or infinite"),
        (lambda: evaluate(torch.randn(6), GOOD_Y), "2-D"),
        (lambda: evaluate(GOOD_X, GOOD_Y.float()), "integers"),
        (lambda: evaluate(GOOD_X, GOOD_Y.view(2, 3)), "1-D"),
        (lambda: evaluate(GOOD_X, GOOD_Y, metric="manhattan"), "metric"),
        (lambda: evaluate(GOOD_X, GOOD_Y, backend="annoy"), "backend"),
        (lambda: evaluate(GOOD_X, GOOD_Y, chunk_size=0), "chunk_size"),
        (lambda: evaluate(GOOD_X, GOOD_Y, ks=()), "ks"),
        (lambda: recall_at_k(GOOD_X, GOOD_Y, ks=(1, 0)), "ks"),
        (lambda: nearest_neighbors(GOOD_X, 6), r"k must be an integer in \[1, N - 1\]"),
        (lambda: nearest_neighbors(GOOD_X, 0), "k must be"),
        (lambda: map_at_r(GOOD_X, [0, 0, 1]), "3 labels for 6"),
        (lambda: nmi(GOOD_X, torch.full((6,), -1)), "unlabelled"),
    ],
)
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r"pip install faiss-cpu.*plmetric\[faiss\]"):
        nearest_neighbors(GOOD_X, 2, backend="faiss")
    with pytest.raises(ImportError, match="faiss-cpu"):
        evaluate(GOOD_X, GOOD_Y, backend="faiss")
    assert evaluate(GOOD_X, GOOD_Y, backend="auto", compute_nmi=False)["num_images"] == 6


def test_no_positive_pairs_gives_zero_recall_and_nan_map():
    x, y = torch.randn(5, 3), torch.arange(5)
    metrics = evaluate(x, y, (1, 4, 100), compute_nmi=False)
    assert metrics["recall@1"] == metrics["recall@4"] == metrics["recall@100"] == 0.0
    assert np.isnan(metrics["map@r"]) and np.isnan(metrics["r_precision"])
    assert evaluation.recall_at_k(x, y, (100,), backend="faiss" if HAVE_FAISS else "torch") == {"recall@100": 0.0}
