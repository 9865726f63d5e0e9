"""Label-free model selection: which epoch to keep, judged from unlabelled training images only.

After every epoch the trainer embeds a fixed random subset of the (readable) training images with
the network it keeps, and with the student when it keeps the teacher, and computes these criteria
on the subset's cosine k-nearest-neighbour graphs (no label is read):

* ``mutual_knn`` (the default rule, ``train.select``): the share of k-NN relations that are mutual,
  ``|{(i, j): j ∈ N(i), i ∈ N(j)}| / (n k)``. Embeddings that group images into tight, well
  separated groups have many reciprocal neighbours.
* ``start_agreement``: the mean overlap of every image's k nearest neighbours with those of the
  untrained start, ``mean_i |N_t(i) ∩ N_0(i)| / k``: how much of the pretrained neighbourhood
  structure survives (1 at the start).
* ``student_teacher_agreement``: the same overlap between the student's and the teacher's graphs
  (1 when they agree, or when the student is the kept network).
* ``neighbour_margin``: ``mean_i [mean_{j ∈ N(i)} cos(x_i, x_j) - mean_{j ∉ N(i) ∪ {i}} cos(x_i, x_j)]``,
  how far a neighbourhood stands out from the rest.
* ``consensus``: ``mutual_knn · start_agreement``: structure gained, discounted by the pretrained
  structure lost. At the start it is the start's own mutual share.
* ``anchored_mutual_knn``: ``mutual_knn · start_agreement^(1/4)``: the mutual share, discounted a
  little by the pretrained structure lost; it keeps ``mutual_knn``'s ranking of good epochs but
  refuses an epoch that rebuilt the neighbourhoods into new tight groups unrelated to the start
  (a collapsing run raises ``mutual_knn`` while it destroys retrieval).
* ``effective_rank`` (RankMe; Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the
  Downstream Performance of Pretrained Self-Supervised Representations by Their Rank", ICML 2023):
  ``exp(-Σ_k p_k log p_k)`` with ``p_k = σ_k / Σ σ`` the normalised singular values of the (n, d)
  embeddings; a collapsing (over-contracted) embedding loses rank.
* ``uniformity`` (Wang & Isola, "Understanding Contrastive Representation Learning through
  Alignment and Uniformity on the Hypersphere", ICML 2020): ``-log mean_{i≠j} exp(-2 ‖x_i - x_j‖²)``
  of the L2-normalised embeddings; higher is more evenly spread.

:data:`SELECTION_RULES` names the criterion each rule maximises; ``final`` keeps the last epoch.
The rules were judged by their regret (test R@1 of the label-chosen best epoch minus that of the
epoch they pick) and rank correlation over every run of the studies on three data sets
(``benchmarks/selection_report.py``; ``docs/results.md``, 87 runs): mean regret 0.61 for the final
epoch, 0.66 for ``mutual_knn`` (the default: a criterion a user without labels can read, and one that
can say "training did not help"), 0.62 for ``anchored_mutual_knn`` (max 3.16 against 7.56: it refuses
collapsing runs, but stops supervised runs early); the others mostly pick the start, because
training lowers them (agreement with the start, margin, rank, uniformity) whether it helps or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from plmetric.core.validation import check_embeddings, check_int

__all__ = ["CRITERIA", "SELECTION_RULES", "knn_indices", "neighbour_overlap", "selection_criteria"]

CRITERIA = (
    "mutual_knn",
    "start_agreement",
    "student_teacher_agreement",
    "neighbour_margin",
    "consensus",
    "anchored_mutual_knn",
    "effective_rank",
    "uniformity",
)
SELECTION_RULES = ("final", *CRITERIA)
ANCHOR_EXPONENT = 0.25  # anchored_mutual_knn's weight of the start agreement (selection_report: 0.25, 0.5, 1, 2)


@torch.no_grad()
def knn_indices(embeddings: Tensor, k: int) -> Tensor:
    """(n, k) indices of each row's k most cosine-similar other rows (the row itself excluded)."""
    x = F.normalize(check_embeddings(embeddings, "knn_indices: embeddings", min_rows=2).float(), dim=1)
    k = min(check_int("k", k, 1), x.shape[0] - 1)
    sims = x @ x.T
    sims.fill_diagonal_(float("-inf"))
    return sims.topk(k, dim=1).indices


@torch.no_grad()
def neighbour_overlap(a: Tensor, b: Tensor) -> float:
    """``mean_i |A(i) ∩ B(i)| / k`` for two (n, k) neighbour tables of the same points."""
    if a.shape != b.shape:
        raise ValueError(f"neighbour_overlap: tables of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    same = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2)
    return float(same.float().mean())


@torch.no_grad()
def selection_criteria(kept: Tensor, start: Tensor, student: Tensor | None = None, k: int = 10) -> dict[str, float]:
    """Every criterion of the module docstring for one epoch.

    Args:
        kept: (n, d) embeddings of the subset by the network that is kept (evaluated, saved).
        start: (n, d) the same images embedded by the untrained start.
        student: (n, d) the student's embeddings when the teacher is kept (None: kept is the student).
        k: neighbours per image.

    Returns:
        ``{criterion: value}`` for every name in :data:`CRITERIA`.
    """
    x = F.normalize(check_embeddings(kept, "selection: kept", min_rows=3).float(), dim=1)
    n = x.shape[0]
    table = knn_indices(x, k)
    k = table.shape[1]
    member = torch.zeros(n, n, dtype=torch.bool, device=x.device).scatter_(1, table, True)
    mutual = float((member & member.T).sum()) / (n * k)
    start_overlap = neighbour_overlap(table, knn_indices(start.to(x.device), k))
    st_overlap = 1.0 if student is None else neighbour_overlap(table, knn_indices(student.to(x.device), k))
    sims = x @ x.T
    others = ~member & ~torch.eye(n, dtype=torch.bool, device=x.device)
    inside = (sims * member).sum(1) / k
    outside = (sims * others).sum(1) / others.sum(1).clamp_min(1)
    singular = torch.linalg.svdvals(x.double())
    p = singular / singular.sum() + 1e-12
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    squared = (2.0 - 2.0 * sims).clamp_min(0)[off]  # ‖x_i - x_j‖² of unit vectors
    return {
        "mutual_knn": mutual,
        "start_agreement": start_overlap,
        "student_teacher_agreement": st_overlap,
        "neighbour_margin": float((inside - outside).mean()),
        "consensus": mutual * start_overlap,
        "anchored_mutual_knn": mutual * start_overlap**ANCHOR_EXPONENT,
        "effective_rank": float(torch.exp(-(p * p.log()).sum())),
        "uniformity": float(-torch.log(torch.exp(-2.0 * squared.double()).mean())),
    }
