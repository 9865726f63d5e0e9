"""Typed option objects, each defined once with its defaults and its checks.

The config holds them (its ``plm``, ``stml`` and ``supervised`` sections *are* these classes), and
the functions that use them take them whole: ``fit_pieces(x, cfg.plm)`` reads the
:class:`PieceOptions` fields of the ``plm`` section, ``point_similarity(pieces, cfg.plm)`` its
:class:`SimilarityOptions` fields. Keyword arguments override single fields
(``fit_pieces(x, tau=1.0)``) through :func:`resolve`, which checks them.

``[choice]`` marks our choices where METHOD.md's paper is silent (METHOD.md lists them).
It also holds the registry of training methods by name (:data:`METHOD_REGISTRY`), and the defaults
and choices that the command line's parsers show (``--faiss auto``'s rule, the pile tools').
Importing this module is cheap (no torch, no numpy): ``plmetric --help`` reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from plmetric.core.validation import (
    MAX_BATCH_SIZE,
    MAX_EMBEDDING_DIM,
    check_bool,
    check_choice,
    check_int,
    check_number,
)

__all__ = [
    "METHOD_REGISTRY",
    "AUTO_EXACT_BELOW",
    "AUTO_KIND",
    "MEMORY_BUDGET_MIB",
    "CALIBRATION_EDITS",
    "CALIBRATION_MAX_SAMPLE",
    "CALIBRATION_SAMPLE",
    "DUPLICATES_CANDIDATES",
    "DUPLICATES_HASH_DISTANCE",
    "DUPLICATES_THRESHOLD",
    "DUPLICATES_ZOOMS",
    "GROUPS_CHOICE_SAMPLE",
    "GROUPS_HDBSCAN_MAX",
    "GROUPS_METHODS",
    "GROUPS_REDUCED_DIM",
    "DELTA_MODES",
    "INDEX_KINDS",
    "LOSS_FORMS",
    "PAIR_SCOPES",
    "SYMMETRIZE_RULES",
    "TARGET_SPACES",
    "PIECE_NEIGHBOURHOODS",
    "IndexOptions",
    "ManifoldOptions",
    "PLMLossOptions",
    "method_names",
    "PLMOptions",
    "PieceOptions",
    "STMLOptions",
    "SimilarityOptions",
    "SupervisedOptions",
    "resolve",
]

SYMMETRIZE_RULES = ("mean", "min", "max")
DELTA_MODES = ("fixed", "batch", "teacher")
LOSS_FORMS = ("regression", "contrastive")
TARGET_SPACES = ("embedding", "features", "blend", "anneal")
PIECE_NEIGHBOURHOODS = ("knn", "mutual")
PAIR_SCOPES = ("batch", "neighbourhood")
#: ``none``: exact torch search; ``auto``: exact below :data:`AUTO_EXACT_BELOW` vectors, else
#: :data:`AUTO_KIND` while its memory fits ``--memory-budget``, else ``ivfpq``; ``flat``, ``ivf``, ``hnsw``,
#: ``ivfpq`` (IVF with product-quantised codes, re-ranked exactly): that faiss index (:mod:`plmetric.manifold.ann`).
INDEX_KINDS = ("none", "auto", "flat", "ivf", "hnsw", "ivfpq")
# What computes a forward pass without gradient (plmetric.data.runtime): auto = onnxruntime on a CPU when it
# is installed and the network exports, else PyTorch.
INFERENCE_RUNTIMES = ("auto", "torch", "onnxruntime")
#: ``--faiss auto`` searches exactly (torch) below this many vectors. Measured on this project's
#: 2-core CPU box, shared with other jobs (benchmarks/index_scale.py, 512-d,
#: benchmarks/results/index_scale_cpu.json): one exact query took 1.8 ms at 10k vectors and
#: 67 ms at 100k (21 ms in an earlier, quieter run; a matrix-vector product over all n rows,
#: linear in n), HNSW 0.2-0.5 ms at either size; but HNSW took 2.7 s to build at 10k and
#: 117 s at 100k (88 s earlier), IVF 0.8 s and 35 s. Below ~50k vectors an exact query stays
#: near 10-30 ms, less than embedding the query image itself on a CPU, while an index build
#: would cost about a minute: exact (no build, no extra file, no approximation) is the better
#: default there.
AUTO_EXACT_BELOW = 50_000
#: The kind ``--faiss auto`` picks from AUTO_EXACT_BELOW on: at 100k vectors HNSW answered a
#: batch of queries 6.8x faster than the exact search at recall@10 0.998 (IVF at its default
#: nprobe: 2.8x, recall 1.0) and one query in 0.5 ms (IVF 1.5 ms); unlike IVF it needs no
#: training and stays as good when vectors are added later. It costs a slower build and
#: about 10% more memory and disk than the vectors themselves (M links per vector).
AUTO_KIND = "hnsw"
MEMORY_BUDGET_MIB = 4096
"""The default ``--memory-budget``: the MiB a faiss index may take in memory when searched (the index itself;
the vectors kept for re-ranking are read from disk). ``auto`` keeps HNSW while its estimate fits (512-d, M=32:
about 1.8M vectors), then switches to ``ivfpq``, whose product-quantisation codes are sized to it. 4 GiB:
the issue's ``serve`` target on a 10M index (4 GB resident) and a third of this project's 2-core, 23 GB box."""

# The pile tools' defaults and choices, here as plain values so that the command line's parsers read
# them without importing torch; plmetric.retrieval.duplicates and .groups re-export them under their
# short names (DEFAULT_THRESHOLD, ZOOMS, CANDIDATES; METHODS, REDUCED_DIM, HDBSCAN_MAX).
DUPLICATES_THRESHOLD = 0.82
"""``plmetric duplicates``' default cosine threshold, for the pretrained backbone's pooled features.
Measured with planted copies (benchmarks/duplicates.py, docs/results.md: 300 originals each of the CUB
subset and plankton106, 360 copies resized, JPEG-recompressed, cropped 80-90 %, mirrored, brightened):
no threshold reached recall >= 0.95 at precision >= 0.95 on either set, so the default is the one that
maximises the smaller F1 of the two (0.82: F1 0.975 on CUB, 0.847 on plankton; 0.81-0.825 within
0.001). At 0.95 precision was 1.0 but recall 0.54 / 0.18 (crops: 0.00 / 0.05)."""
DUPLICATES_ZOOMS = (0.9, 0.8)
"""``check_crops`` re-embeds each candidate image's centre crop keeping these fractions of each side."""
DUPLICATES_CANDIDATES = 0.70
"""``check_crops`` rescores the pairs at or above this cosine (on CUB photos, planted 80-90 % crops of
the pretrained features scored 0.739 at the lowest; distinct photos rarely rise above the threshold
when zoomed)."""
DUPLICATES_HASH_DISTANCE = 6
"""``plmetric duplicates``' default bound on the perceptual-hash distance (mirror-invariant Hamming distance of
64-bit phashes, :mod:`plmetric.retrieval.hashes`) of a pair found by the hash signal (which also needs cosine >=
``DUPLICATES_CANDIDATES``). Provisional, measured on 300 random images each of plankton106 and the CUB subset
(the project's shared dev data): half-size copies lay at distance <= 6 (99 %: 2), JPEG q30 copies <= 8 (99 %: 6 / 2), mirrored
copies at 0, brightened x1.2 copies 99 % <= 16 / 6; 85 % crops far (median 12-16: the hash does not find crops).
Of the 44,850 pairs of different images, 21 (plankton: white backgrounds, one small central shape) and 0 (CUB)
lay at <= 6; 54 and 1 at <= 8. A per-pile calibration may store its own value in the index."""
# duplicates calibration at index time (plmetric.retrieval.calibration re-exports these)
CALIBRATION_EDITS = ("resize50", "jpeg30", "crop85", "flip", "tone")
"""The edits that make a sampled image's copies (why each: plmetric.retrieval.calibration)."""
CALIBRATION_SAMPLE = 128
"""Images copied by default (``plmetric index --calibration-sample``); 128 x 5 copies cost about twice
embedding a 300-image pile."""
CALIBRATION_MAX_SAMPLE = 10_000
GROUPS_METHODS = ("kmeans", "hdbscan")
GROUPS_REDUCED_DIM = 64
"""HDBSCAN runs on the embeddings projected to this many principal components (16, 32, 64 compared on
the CUB subset and plankton106 test splits, pretrained features: 64 had the highest AMI on both)."""
GROUPS_HDBSCAN_MAX = 20_000
"""Above this many images ``plmetric groups --method hdbscan`` warns of its time: scikit-learn's HDBSCAN
on 64-d points on this project's 2-core CPU took 1.9 s at 5k, 7.5 s at 10k, 38 s at 20k (growing as
about n^2.3): at 50k it would take minutes, at 1M days."""
GROUPS_CHOICE_SAMPLE = 20_000
"""Without ``--groups``, the number of k-means groups is chosen on at most this many images (a seeded
random sample of a larger pile): its k-NN graph costs O(n^2 d) once, each k tried O(n k d)."""


# Upper bounds of the method and index options (generous for real use; faiss takes 32-bit ints).
MAX_PIECE_DIM = 64
"""``m``: a piece is a local linear patch of a few dimensions (the paper's m is 2)."""
MAX_PIECE_POINTS = 1_024
"""``n_max``, ``min_points``, ``k_plain``: points of one piece (the paper's 10); each fit costs ``n_max²``
distances per point."""
MAX_PROXIES = 100_000
"""``num_proxies``: the paper's 300; each proxy is an embedding-sized vector and a column of a batch's
similarity matrix."""
MAX_NLIST = 1 << 24
"""IVF cells (and ``nprobe``): the default is ``4 sqrt(n)``; 16.7 million cells would suit 10^13 vectors."""
MAX_HNSW_M = 512
"""HNSW links per vector: faiss suggests 4-64; each link costs 4-8 bytes per vector and layer."""
MAX_PQ_M = 256
"""Product-quantisation sub-vectors (4 bits each): 256 is 128 bytes a vector, a 16th of a 512-d float32 vector."""
MAX_MEMORY_BUDGET_MIB = 1 << 30
"""``--memory-budget``: a MiB count up to 1 PiB."""
MAX_EF = 1 << 20
"""HNSW build and search beams: the defaults are 64-200, and ``ef_search`` must cover ``--top-k``
(at most :data:`plmetric.core.validation.MAX_NEIGHBOURS`)."""


Options = TypeVar("Options")


def resolve(cls: type[Options], options: Any = None, **fields: Any) -> Options:
    """An instance of ``cls`` from ``options`` (an instance of ``cls`` or of a class that holds all
    its fields, e.g. the config's ``plm`` section) with ``fields`` overriding single values; checked.

    Raises:
        TypeError: a field ``cls`` does not have.
        ValueError: a value out of range (the message names the field).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {', '.join(unknown)}; its options: {', '.join(names)}")
    if options is None and not fields:
        return cls()
    base = {} if options is None else {name: getattr(options, name) for name in names}
    resolved = cls(**{**base, **fields})
    resolved.validate()
    return resolved


@dataclass
class PieceOptions:
    """How the local linear pieces are fitted (METHOD.md §2, slides 5 and 8): :func:`plmetric.manifold.pieces.fit_pieces`."""

    m: int = 2  # dimension of the pieces [choice: 2]
    tau: float = 0.5  # error threshold, relative to the median nearest-neighbour distance [choice: 0.5]
    n_max: int = 10  # most points in a piece, the anchor included [choice: 2k = 10]
    min_points: int | None = None  # fewest points in a piece, the anchor included (default m + 1)
    subset_selection: bool = True  # greedy growth with the threshold (the paper) or plain k-NN + PCA
    k_plain: int = 5  # neighbours besides the anchor without subset selection (ablation, slide 15)
    # which candidates a piece may grow by: the nearest (knn, the paper) or only mutual nearest
    # neighbours (j among i's n_max - 1 nearest and i among j's), so a piece keeps to its own class
    neighbourhoods: str = "knn"

    def validate(self, where: str = "") -> None:
        """Raise ValueError for an option out of range."""
        check_int("m", self.m, 1, maximum=MAX_PIECE_DIM, where=where)
        if self.min_points is not None:
            check_int("min_points", self.min_points, self.m + 1, maximum=MAX_PIECE_POINTS, where=where)
        check_number("tau", self.tau, where=where)
        check_int("n_max", self.n_max, self.minimum_points, maximum=MAX_PIECE_POINTS, where=where)
        check_int("k_plain", self.k_plain, self.m, maximum=MAX_PIECE_POINTS, where=where)
        check_bool("subset_selection", self.subset_selection, where=where)
        check_choice("neighbourhoods", self.neighbourhoods, PIECE_NEIGHBOURHOODS, where=where)

    @property
    def minimum_points(self) -> int:
        """The fewest points in a piece: ``min_points``, or ``m + 1`` when it is None."""
        return self.m + 1 if self.min_points is None else self.min_points


@dataclass
class SimilarityOptions:
    """How point and proxy similarities are computed from pieces (METHOD.md §3-4, slide 9)."""

    n_alpha: float = 5.0  # decay exponent orthogonal to the piece [choice: 5]
    n_beta: float = 0.5  # decay exponent along the piece [choice: 0.5]
    symmetrize: str = "mean"  # s = mean | min | max (s'(a, b), s'(b, a)) [choice: mean]
    binary: bool = False  # piece membership instead of the graded similarity (ablation, slide 15)

    def validate(self, where: str = "") -> None:
        """Raise ValueError for an option out of range."""
        check_number("n_alpha", self.n_alpha, where=where)
        check_number("n_beta", self.n_beta, where=where)
        check_choice("symmetrize", self.symmetrize, SYMMETRIZE_RULES, where=where)
        check_bool("binary", self.binary, where=where)


@dataclass
class ManifoldOptions(SimilarityOptions, PieceOptions):
    """Pieces and similarities together: the whole PLM similarity estimate
    (:func:`plmetric.manifold.pieces.plm_similarity`)."""

    def validate(self, where: str = "") -> None:
        PieceOptions.validate(self, where)
        SimilarityOptions.validate(self, where)


@dataclass
class PLMLossOptions:
    """The PLM losses and their proxies (METHOD.md §4-5, slide 11)."""

    num_proxies: int = 300  # N_ρ [choice: 300]; 0 disables the proxies (ablation)
    delta: float = 1.0  # δ, the distance that similarity 0 maps to [choice: 1]
    delta_mode: str = "fixed"  # fixed (the paper), batch (mean target = mean distance), teacher (per pair)
    loss_form: str = "regression"  # regression (the paper: d -> δ(1 - s)) or contrastive (STML's form, W = s)
    normalize_rows: bool = False  # regression on row-normalised student distances (as STML)
    proxy_neighbours: int = 5  # n most similar batch points that L_neighbourhood pulls each proxy to
    # where the point targets' manifold is built: the teacher's embedding (the paper), its pooled
    # backbone features (L2-normalised, before the embedding layer), a fixed blend of both
    # (s = (1 - λ) s_features + λ s_embedding, λ = target_blend) or an anneal from the features to
    # the embedding over training (λ = the fraction of training done)
    target_space: str = "embedding"
    target_blend: float = 0.5  # λ of target_space=blend: the weight of the embedding's similarity
    # which pairs L_point regresses: every pair of the batch (the paper), or the pairs inside each
    # sampled neighbourhood, the others only pushed apart when closer than their target
    pair_scope: str = "batch"
    weight_point: float = 1.0
    weight_proxy: float = 1.0
    weight_neighbourhood: float = 1.0

    def validate(self, where: str = "") -> None:
        """Raise ValueError for an option out of range."""
        check_int("num_proxies", self.num_proxies, 0, maximum=MAX_PROXIES, where=where)
        check_number("delta", self.delta, where=where)
        check_choice("delta_mode", self.delta_mode, DELTA_MODES, where=where)
        check_choice("loss_form", self.loss_form, LOSS_FORMS, where=where)
        check_bool("normalize_rows", self.normalize_rows, where=where)
        check_int("proxy_neighbours", self.proxy_neighbours, 1, maximum=MAX_BATCH_SIZE, where=where)
        check_choice("target_space", self.target_space, TARGET_SPACES, where=where)
        check_number("target_blend", self.target_blend, where=where)
        if self.target_blend > 1:
            raise ValueError(f"{where}target_blend must be a number in [0, 1], got {self.target_blend!r}")
        check_choice("pair_scope", self.pair_scope, PAIR_SCOPES, where=where)
        for name in ("weight_point", "weight_proxy", "weight_neighbourhood"):
            check_number(name, getattr(self, name), where=where)


@dataclass
class PLMOptions(PLMLossOptions, ManifoldOptions):
    """Everything PLM needs: the config's ``plm`` section (pieces, similarities, losses)."""

    def validate(self, where: str = "") -> None:
        ManifoldOptions.validate(self, where)
        PLMLossOptions.validate(self, where)


@dataclass
class STMLOptions:
    """STML, the peer method (Kim et al., CVPR 2022; METHOD.md's last section): the ``stml`` section."""

    sigma: float = 3.0  # Gaussian kernel width of W_P (3 in the paper's runs)
    delta: float = 1.0  # margin of the relaxed contrastive loss (0.9 on SOP)
    topk: int = 5  # neighbours of the contextual similarity W_C, the point itself included
    query_expansion: int | None = None  # rows averaged in W_C's query expansion; None: round(topk / 2)
    g_dim: int = 1024  # the auxiliary head whose teacher gives the targets
    weight_kl: float = 1.0  # self-distillation from the auxiliary head to the embedding
    normalize_student: bool = True  # L2-normalise the student heads inside the loss (their disable_mu)

    def validate(self, where: str = "") -> None:
        """Raise ValueError for an option out of range."""
        check_number("sigma", self.sigma, strict=True, where=where)
        check_number("delta", self.delta, where=where)
        check_int("topk", self.topk, 1, maximum=MAX_BATCH_SIZE, where=where)
        if self.query_expansion is not None:
            check_int("query_expansion", self.query_expansion, 1, maximum=MAX_BATCH_SIZE, where=where)
        check_int("g_dim", self.g_dim, 1, maximum=MAX_EMBEDDING_DIM, where=where)
        check_number("weight_kl", self.weight_kl, where=where)
        check_bool("normalize_student", self.normalize_student, where=where)


@dataclass
class SupervisedOptions:
    """The supervised ceiling: pytorch-metric-learning's multi-similarity loss and miner (Wang et
    al., CVPR 2019) on class-balanced batches of the train split's labels: the ``supervised`` section."""

    alpha: float = 2.0  # weight of positive pairs (pml's default)
    beta: float = 50.0  # weight of negative pairs (pml's default)
    base: float = 0.5  # similarity margin λ (pml's default)
    miner_epsilon: float = 0.1  # multi-similarity miner margin; 0 disables the miner
    per_class: int = 5  # images of each class in a batch (m of MPerClassSampler)

    def validate(self, where: str = "") -> None:
        """Raise ValueError for an option out of range."""
        check_number("alpha", self.alpha, strict=True, where=where)
        check_number("beta", self.beta, strict=True, where=where)
        check_number("base", self.base, -1.0, where=where)
        check_number("miner_epsilon", self.miner_epsilon, where=where)
        check_int("per_class", self.per_class, 2, maximum=MAX_BATCH_SIZE, where=where)


@dataclass
class IndexOptions:
    """The nearest-neighbour index of a ``plmetric index`` file (:mod:`plmetric.manifold.ann`).

    ``None`` means "chosen from the number of vectors n" (:func:`plmetric.manifold.ann.plan_index` documents
    the rules); the search-time options (``nprobe``, ``ef_search``) are recorded in the index and
    may be overridden per search.
    """

    kind: str = "none"  # one of INDEX_KINDS
    nlist: int | None = None  # IVF cells; None: from n (plmetric.manifold.ann.default_nlist)
    nprobe: int | None = None  # IVF cells visited per query; None: from nlist (plmetric.manifold.ann.default_nprobe)
    hnsw_m: int = 32  # HNSW links per node and layer (faiss's M)
    ef_construction: int | None = None  # HNSW build beam; None: from n (plmetric.manifold.ann.default_ef_construction)
    ef_search: int | None = None  # HNSW search beam (at least k); None: from n (plmetric.manifold.ann.default_ef_search)
    # MiB the faiss index may take in memory; None: MEMORY_BUDGET_MIB (auto's switch to ivfpq, ivfpq's code size)
    memory_budget_mib: int | None = None
    pq_m: int | None = None  # ivfpq PQ sub-vectors, 4 bits each (m / 2 bytes a vector); None: from the budget (plan_index)

    def validate(self, where: str = "") -> None:
        """Raise ValueError for an option out of range."""
        check_choice("kind", self.kind, INDEX_KINDS, where=where)
        for name, maximum in (("nlist", MAX_NLIST), ("nprobe", MAX_NLIST), ("ef_construction", MAX_EF),
                              ("ef_search", MAX_EF)):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, maximum=maximum, where=where)
        if self.memory_budget_mib is not None:
            check_int("memory_budget_mib", self.memory_budget_mib, 1, maximum=MAX_MEMORY_BUDGET_MIB, where=where)
        if self.pq_m is not None:
            check_int("pq_m", self.pq_m, 1, maximum=MAX_PQ_M, where=where)
        check_int("hnsw_m", self.hnsw_m, 2, maximum=MAX_HNSW_M, where=where)


# The training methods (plmetric.methods, one module each) by name; the config's train.method check and
# the command line's --method choices read it. A string, not an import: this layer imports no method.
# name -> "module:class". The order is the order of tables and --help.
METHOD_REGISTRY: dict[str, str] = {
    "none": "plmetric.methods.none:NoTraining",
    "plm": "plmetric.methods.plm:PLMMethod",
    "stml": "plmetric.methods.stml:STMLMethod",
    "supervised": "plmetric.methods.supervised:SupervisedMethod",
}


def method_names() -> tuple[str, ...]:
    """The registered method names."""
    return tuple(METHOD_REGISTRY)
