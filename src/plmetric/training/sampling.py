"""Neighbourhood sampling and the momentum teacher (METHOD.md §1 and "Networks").

* :func:`make_teacher` / :func:`ema_update`: the teacher f_φ is an exponential moving average of the
  student f_θ, φ ← m·φ + (1 - m)·θ, updated after every optimiser step.
* :class:`MemoryBank`: the teacher embeddings of the whole training set, L2-normalised, refreshed from
  each batch's teacher outputs (plus a full refresh every few epochs, done by the trainer); it gives
  every item's k nearest other items under cosine similarity.
* :class:`NeighbourhoodBatchSampler`: batches of B = (B/k)·k indices, B/k random seed images each
  followed by its k-1 nearest neighbours from the bank's neighbour table; DDP-aware (every rank builds
  the same global batch and takes a contiguous slice) and resumable mid-epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from plmetric.core.validation import check_int, value_checks_enabled

__all__ = ["ClassBalancedBatchSampler", "MemoryBank", "NeighbourhoodBatchSampler", "ema_update", "make_teacher"]

# Default element budget of one similarity chunk in MemoryBank.neighbours (chunk_size * N entries).
_SIMILARITY_CHUNK_ELEMENTS = 1 << 24
# From this many bank rows the neighbour table comes from a faiss HNSW index (when faiss is
# installed): the exact table is O(N² d), quadratic in the bank, HNSW's about O(N log N · d)
# (benchmarks/index_scale.py times both). Below it the table stays exact and reproducible (exact resume).
BANK_APPROXIMATE_ABOVE = 200_000


# --------------------------------------------------------------------------------------------------
# Momentum teacher
# --------------------------------------------------------------------------------------------------


def make_teacher(student: nn.Module) -> nn.Module:
    """Return the initial teacher: a deep copy of ``student`` with ``requires_grad=False``, in eval mode.

    The teacher stays in eval mode for the whole run: its BatchNorm layers use the running statistics
    that :func:`ema_update` maintains, never the statistics of the batch it embeds.
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def _paired(
    kind: str, teacher_items: list[tuple[str, Tensor]], student_items: list[tuple[str, Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    """Pair the teacher's and student's tensors by name; ValueError on any architecture mismatch."""
    teacher_names = [name for name, _ in teacher_items]
    student_names = [name for name, _ in student_items]
    if teacher_names != student_names:
        only_teacher = sorted(set(teacher_names) - set(student_names))
        only_student = sorted(set(student_names) - set(teacher_names))
        raise ValueError(
            f"ema_update: teacher and student {kind} differ (mismatched architectures): "
            f"only in teacher {only_teacher[:5]}, only in student {only_student[:5]}"
            + ("" if only_teacher or only_student else ", same names in a different order")
        )
    for (name, t), (_, s) in zip(teacher_items, student_items, strict=True):
        if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
            raise ValueError(
                f"ema_update: {kind[:-1]} {name!r} is {tuple(t.shape)} {t.dtype} on {t.device} in the "
                f"teacher but {tuple(s.shape)} {s.dtype} on {s.device} in the student (mismatched "
                "architectures, or teacher and student on different devices/dtypes)"
            )
    return [t for _, t in teacher_items], [s for _, s in student_items]


@torch.no_grad()
def ema_update(
    teacher: nn.Module,
    student: nn.Module,
    momentum: float,
    *,
    buffers: Literal["ema", "copy"] = "ema",
) -> None:
    """Move the teacher towards the student in place: φ ← m·φ + (1 - m)·θ.

    Every parameter is updated with batched ``torch._foreach`` ops (one fused lerp, no Python loop over
    elements). Buffers: floating buffers (BatchNorm running mean/var) are, with ``buffers="ema"`` (the
    default, as STML's public code does), averaged with the same momentum; with ``buffers="copy"``
    copied from the student. Non-floating buffers (``num_batches_tracked``) are always copied.

    Args:
        teacher: the EMA model, updated in place (see :func:`make_teacher`).
        student: the trained model; same architecture, parameter dtypes and devices as the teacher.
            Pass the bare module, not a DDP wrapper (whose names carry a ``module.`` prefix).
        momentum: m in [0, 1]; 0 copies the student, 1 leaves the teacher unchanged.
        buffers: ``"ema"`` or ``"copy"``, the treatment of floating buffers.

    Raises:
        ValueError: momentum outside [0, 1], unknown ``buffers``, or teacher and student whose named
            parameters/buffers differ in names, shapes, dtypes or devices.
    """
    try:
        m = float(momentum)
    except (TypeError, ValueError):
        raise ValueError(f"ema_update: momentum must be a number in [0, 1], got {momentum!r}") from None
    if not 0.0 <= m <= 1.0:  # also rejects NaN
        raise ValueError(f"ema_update: momentum must lie in [0, 1], got {momentum!r}")
    if buffers not in ("ema", "copy"):
        raise ValueError(f"ema_update: buffers must be 'ema' or 'copy', got {buffers!r}")

    t_params, s_params = _paired("parameters", list(teacher.named_parameters()), list(student.named_parameters()))
    t_bufs, s_bufs = _paired("buffers", list(teacher.named_buffers()), list(student.named_buffers()))

    if t_params:
        # lerp(φ, θ, w) = φ + w (θ - φ) = (1 - w) φ + w θ with w = 1 - m; exact at m = 0 and m = 1.
        torch._foreach_lerp_(t_params, s_params, 1.0 - m)

    floating = [i for i, t in enumerate(t_bufs) if t.is_floating_point()]
    other = [i for i, t in enumerate(t_bufs) if not t.is_floating_point()]
    if floating:
        t_float = [t_bufs[i] for i in floating]
        s_float = [s_bufs[i] for i in floating]
        if buffers == "ema":
            torch._foreach_lerp_(t_float, s_float, 1.0 - m)
        else:
            torch._foreach_copy_(t_float, s_float)
    if other:
        torch._foreach_copy_([t_bufs[i] for i in other], [s_bufs[i] for i in other])


# --------------------------------------------------------------------------------------------------
# Memory bank
# --------------------------------------------------------------------------------------------------


class MemoryBank:
    """Teacher embeddings of the whole training set (N, d), L2-normalised, on a device.

    Rows start as zeros and ``filled[i]`` is False until row i is first written by :meth:`update`.

    Attributes:
        embeddings: (N, d) tensor of unit-norm rows (zeros where not filled).
        filled: (N,) bool tensor, True for rows written at least once.
    """

    def __init__(
        self, num_items: int, dim: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"MemoryBank: num_items must be a positive integer, got {num_items!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"MemoryBank: dim must be a positive integer, got {dim!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"MemoryBank: dtype must be a floating dtype, got {dtype}")
        self.num_items = num_items
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.embeddings = torch.zeros(num_items, dim, device=self.device, dtype=dtype)
        self.filled = torch.zeros(num_items, device=self.device, dtype=torch.bool)

    @torch.no_grad()
    def update(self, indices: Tensor, embeddings: Tensor) -> None:
        """Write ``normalize(embeddings[j])`` into row ``indices[j]`` for every j (one vectorised scatter).

        Rows are L2-normalised on the way in, cast to the bank's dtype and moved to its device. If an
        index occurs several times, the last occurrence wins (deterministically, on every device).

        Args:
            indices: (n,) integer tensor of item indices in [0, N).
            embeddings: (n, d) tensor of finite, non-zero teacher embeddings (any float dtype/device).

        Raises:
            ValueError: wrong shapes or dtypes, an index outside [0, N), or a non-finite or zero row.
        """
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype in (torch.bool,) or indices.is_floating_point() or indices.is_complex():
            raise ValueError(
                f"MemoryBank.update: indices must be a 1-D integer tensor, got shape "
                f"{tuple(indices.shape)} dtype {indices.dtype}"
            )
        if embeddings.dim() != 2 or embeddings.shape != (indices.shape[0], self.dim):
            raise ValueError(
                f"MemoryBank.update: embeddings must have shape (len(indices), dim) = "
                f"({indices.shape[0]}, {self.dim}), got {tuple(embeddings.shape)}"
            )
        if not embeddings.is_floating_point():
            raise ValueError(f"MemoryBank.update: embeddings must be floating, got {embeddings.dtype}")
        if indices.numel() == 0:
            return
        indices = indices.to(device=self.device, dtype=torch.int64)
        work_dtype = torch.promote_types(self.dtype, torch.float32)
        x = embeddings.detach().to(device=self.device, dtype=work_dtype)
        norms = torch.linalg.vector_norm(x, dim=1)
        # One host sync for all checks (skipped inside plmetric.manifold.pieces.value_checks(False)).
        bad = (indices.min() < 0) | (indices.max() >= self.num_items) | ~torch.isfinite(x).all() | (norms == 0).any()
        if value_checks_enabled() and bool(bad):
            if bool((indices.min() < 0) | (indices.max() >= self.num_items)):
                raise ValueError(
                    f"MemoryBank.update: indices must lie in [0, {self.num_items}), got range "
                    f"[{int(indices.min())}, {int(indices.max())}]"
                )
            raise ValueError("MemoryBank.update: embeddings must be finite and non-zero in every row")
        x = (x / norms.unsqueeze(1)).to(self.dtype)

        # Last write wins, without a host sync: every position writes the row of its index's last
        # occurrence, so repeated indices write identical values (deterministic on every device).
        positions = torch.arange(indices.numel(), device=self.device)
        last = torch.full((self.num_items,), -1, dtype=torch.int64, device=self.device)
        last.scatter_reduce_(0, indices, positions, reduce="amax")
        self.embeddings.index_copy_(0, indices, x[last[indices]])
        self.filled[indices] = True

    @torch.no_grad()
    def neighbours(
        self,
        k: int,
        *,
        chunk_size: int | None = None,
        rows: Tensor | None = None,
        approximate_above: int | None = BANK_APPROXIMATE_ABOVE,
    ) -> Tensor:
        """Indices of each item's k nearest other items under cosine similarity.

        ``out[i]`` lists the k items j ≠ i with the largest ⟨e_i, e_j⟩, most similar first; item i is
        excluded by index, so an exact duplicate of e_i stored in another row is still a neighbour.
        Similarities are computed ``chunk_size`` rows at a time, so the extra memory is
        O(chunk_size · N). Ties are broken arbitrarily.

        With ``rows`` (the bank rows to use, e.g. ``filled.nonzero()`` when some images were
        unreadable), the search runs among those rows only and the table is in *positions* of
        ``rows``: ``out[p]`` lists positions q ≠ p, so ``rows[out]`` are item indices.

        The exact search costs O(N² d); from ``approximate_above`` rows on (when faiss is installed)
        the table comes from a faiss HNSW index instead (:func:`plmetric.manifold.ann.knn_table`: about
        O(N log N · d), approximate, recall measured by ``benchmarks/index_scale.py``).

        Args:
            k: number of neighbours, 1 <= k < N (or < len(rows)).
            chunk_size: rows per similarity chunk; default ≈ 2**24 / N.
            rows: (M,) distinct item indices to restrict the search to (None: all N items).
            approximate_above: the bank size from which faiss HNSW is used (None: always exact).

        Returns:
            (N, k) (or (M, k)) int64 tensor on the bank's device.

        Raises:
            ValueError: a row in use was never written, k outside [1, N), or chunk_size < 1.
        """
        if rows is None:
            embeddings, filled = self.embeddings, self.filled
        else:
            rows = torch.as_tensor(rows, device=self.device).long().flatten()
            embeddings, filled = self.embeddings[rows], self.filled[rows]
        n = embeddings.shape[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
            raise ValueError(f"MemoryBank.neighbours: k must be an integer in [1, N) = [1, {n}), got {k!r}")
        if chunk_size is None:
            chunk_size = max(1, min(n, _SIMILARITY_CHUNK_ELEMENTS // n))
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"MemoryBank.neighbours: chunk_size must be a positive integer, got {chunk_size!r}")
        missing = (~filled).nonzero().flatten()
        if missing.numel():
            raise ValueError(
                f"MemoryBank.neighbours: {missing.numel()} of {n} rows were never filled "
                f"(e.g. items {missing[:5].tolist()}); fill the whole bank first"
            )

        if approximate_above is not None and n >= approximate_above:
            from plmetric.manifold import ann
            if ann.faiss_available():
                plan = ann.plan_index(n, kind="hnsw")
                return ann.knn_table(embeddings, k, plan).to(self.device)
        out = torch.empty(n, k, dtype=torch.int64, device=self.device)
        for start in range(0, n, chunk_size):
            chunk = torch.arange(start, min(start + chunk_size, n), device=self.device)
            sims = embeddings[chunk] @ embeddings.T  # (chunk, N)
            sims[torch.arange(chunk.numel(), device=self.device), chunk] = float("-inf")
            out[chunk] = sims.topk(k, dim=1, largest=True, sorted=True).indices
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of ``embeddings`` and ``filled`` (tensors only: loadable with ``weights_only=True``)."""
        return {"embeddings": self.embeddings.detach().clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the bank keeps its own device and dtype.

        Raises:
            ValueError: missing keys, or shapes that do not match this bank's (num_items, dim).
        """
        missing = {"embeddings", "filled"} - set(state)
        if missing:
            raise ValueError(f"MemoryBank.load_state_dict: state lacks {sorted(missing)}")
        emb, filled = torch.as_tensor(state["embeddings"]), torch.as_tensor(state["filled"])
        if emb.shape != (self.num_items, self.dim) or filled.shape != (self.num_items,):
            raise ValueError(
                f"MemoryBank.load_state_dict: expected embeddings ({self.num_items}, {self.dim}) and "
                f"filled ({self.num_items},) (num_items, dim), got {tuple(emb.shape)} and "
                f"{tuple(filled.shape)}"
            )
        if filled.dtype != torch.bool:
            raise ValueError(f"MemoryBank.load_state_dict: filled must be bool, got {filled.dtype}")
        self.embeddings.copy_(emb)
        self.filled.copy_(filled)


# --------------------------------------------------------------------------------------------------
# Neighbourhood batch sampler
# --------------------------------------------------------------------------------------------------


_NBS = "NeighbourhoodBatchSampler: "
_CBS = "ClassBalancedBatchSampler: "


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator for (seed, epoch), identical on every rank and machine.

    torch's CPU generator keeps only the low 32 bits of its seed, so (seed, epoch) is first hashed to
    32 bits with NumPy's SeedSequence; ``seed * 2**32 + epoch`` would collide across seeds.
    """
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint32)[0]
    return torch.Generator().manual_seed(int(state))


class NeighbourhoodBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of B indices: B/k random seed images, each followed by its k-1 nearest neighbours.

    Epoch e: a permutation of all N items from a CPU ``torch.Generator`` seeded with a 32-bit hash
    of (seed, e) (NumPy ``SeedSequence``; identical on every rank) is cut into groups of S = B/k seeds; global batch b
    is ``[s_1, n_1(s_1), ..., n_{k-1}(s_1), s_2, n_1(s_2), ...]`` for the seeds s_1..s_S of group b, where
    ``n_j(s)`` is column j-1 of row s of the neighbour table. There are N // S batches per epoch
    (``drop_last=True``: every item is a seed at most once, the ragged end is dropped) or ceil(N / S)
    (``drop_last=False``: the last group is completed with the first seeds of the same permutation,
    so every batch still has B items and a few items are seeds twice).

    An epoch that needs more batches than one permutation gives (``min_batches``, e.g. the
    ``train.min_steps`` floor on a small pile) draws further permutations from the same (seed, e)
    generator, one *round* after another, each cut into groups as above: the epoch's first round is
    the one an epoch without ``min_batches`` has, every item is a seed at most once per round, and the
    batches stay a pure function of (seed, e), so replays and resumes are exact.

    Duplicates: when neighbourhoods overlap, an item may appear more than once in a batch (as a seed
    and as a neighbour, or as the neighbour of two seeds). With ``avoid_duplicates=False`` (default,
    as STML's public code) they are kept: the batch is exactly the seeds and the first k-1 table
    columns. With ``avoid_duplicates=True`` each seed's neighbours are, taking the seeds in batch order,
    the first k-1 entries of its table row that are neither a seed of the batch nor already taken;
    give a wider table than k-1 (e.g. ``bank.neighbours(2 * k)``) so there is room to skip. A row
    with too few usable entries fills its remaining slots with its nearest skipped ones (duplicates
    then remain).

    DDP: every rank builds the same global batch and yields the contiguous slice
    ``[rank * B/W, (rank + 1) * B/W)``, so concatenating the ranks' slices in rank order gives the
    one-process batch. A group of k may span two ranks.

    Resume: :meth:`state_dict` holds the epoch, the position within the epoch (batches yielded so far)
    and the neighbour tables, so that after :meth:`load_state_dict` iteration continues with exactly
    the batches the interrupted run would have produced, on any world size. ``position`` counts
    batches *handed out*; a ``DataLoader`` with workers prefetches ahead of training, so a trainer
    using one should overwrite ``state["position"]`` with its own count of batches trained on in
    the epoch before saving.

    Neighbour tables set with :meth:`set_neighbours` take effect when the next epoch starts; an epoch
    in progress (position > 0) keeps the table it started with.

    Args:
        neighbours: (N, W) integer table, row i the indices of item i's nearest other items, nearest
            first (e.g. :meth:`MemoryBank.neighbours`); W >= k-1; must not contain i in row i.
        batch_size: B, the global batch size (all ranks together); divisible by k and world_size.
        k: neighbourhood size, a seed and its k-1 nearest neighbours.
        seed: non-negative base seed of the per-epoch seed permutations.
        rank, world_size: this process's rank and the number of processes (DDP).
        drop_last: drop the ragged last seed group (True) or complete it (False), see above.
        avoid_duplicates: replace items repeated within a batch by further neighbours, see above.
        items: (N,) distinct data set indices of the table's rows (e.g. the readable images, with a
            table from ``bank.neighbours(k, rows=items)``); batches are built on table positions and
            yielded as ``items[position]``. None: the table's rows are the data set indices.
        min_batches: the fewest batches an epoch yields (further rounds of seeds, see above); None
            or at most one round's batches: one round.

    Raises:
        ValueError: an option out of range or inconsistent with the others, or an invalid table; the
            message names the option.
    """

    def __init__(
        self,
        neighbours: Tensor,
        batch_size: int = 120,
        k: int = 5,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        avoid_duplicates: bool = False,
        items: Tensor | None = None,
        min_batches: int | None = None,
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1, where=_NBS)
        self.min_batches = None if min_batches is None else check_int("min_batches", min_batches, 0, where=_NBS)
        self.k = check_int("k", k, 1, where=_NBS)
        if batch_size % k:
            raise ValueError(f"NeighbourhoodBatchSampler: batch_size ({batch_size}) must be divisible by k ({k})")
        self.world_size = check_int("world_size", world_size, 1, where=_NBS)
        if batch_size % world_size:
            raise ValueError(
                f"NeighbourhoodBatchSampler: batch_size ({batch_size}) must be divisible by world_size ({world_size})"
            )
        self.rank = check_int("rank", rank, 0, where=_NBS)
        if rank >= world_size:
            raise ValueError(f"NeighbourhoodBatchSampler: rank ({rank}) must be < world_size ({world_size})")
        self.seed = check_int("seed", seed, 0, where=_NBS)
        self.drop_last = bool(drop_last)
        self.avoid_duplicates = bool(avoid_duplicates)
        self.seeds_per_batch = batch_size // k
        self.epoch = 0
        self.position = 0  # batches of the current epoch handed out so far
        self._neighbours = self._validated(neighbours)
        self._epoch_neighbours: Tensor | None = None  # table of the epoch in progress
        self.items: Tensor | None = None
        if items is not None:
            mapped = torch.as_tensor(items).detach().to("cpu", torch.int64).flatten()
            if mapped.shape[0] != self.num_items or mapped.unique().numel() != mapped.numel():
                raise ValueError(
                    f"NeighbourhoodBatchSampler: items must hold {self.num_items} distinct indices (one per "
                    f"table row), got {mapped.shape[0]}"
                )
            self.items = mapped

    # -- configuration ------------------------------------------------------------------------------

    def _validated(self, neighbours: Tensor, expected_items: int | None = None) -> Tensor:
        table = torch.as_tensor(neighbours)
        if table.dim() != 2 or table.dtype == torch.bool or table.is_floating_point() or table.is_complex():
            raise ValueError(
                "NeighbourhoodBatchSampler: neighbours must be a 2-D integer tensor (N, >= k-1), got "
                f"shape {tuple(table.shape)} dtype {table.dtype}"
            )
        n, width = table.shape
        if expected_items is not None and n != expected_items:
            raise ValueError(
                f"NeighbourhoodBatchSampler: the neighbour table has {n} rows but the sampler was built "
                f"for N = {expected_items} items"
            )
        if width < self.k - 1:
            raise ValueError(
                f"NeighbourhoodBatchSampler: k - 1 ({self.k - 1}) exceeds the neighbour table's width "
                f"({width}); compute at least k - 1 neighbours per item"
            )
        if self.k > n:
            raise ValueError(f"NeighbourhoodBatchSampler: k ({self.k}) exceeds the number of items N ({n})")
        if self.seeds_per_batch > n:
            raise ValueError(
                f"NeighbourhoodBatchSampler: batch_size / k ({self.seeds_per_batch} seeds per batch) "
                f"exceeds the number of items N ({n})"
            )
        table = table.detach().to(device="cpu", dtype=torch.int64, copy=True).contiguous()
        if table.numel():
            if int(table.min()) < 0 or int(table.max()) >= n:
                raise ValueError(
                    f"NeighbourhoodBatchSampler: neighbour indices must lie in [0, N) = [0, {n}), got "
                    f"range [{int(table.min())}, {int(table.max())}]"
                )
            own = (table == torch.arange(n).unsqueeze(1)).any(dim=1).nonzero().flatten()
            if own.numel():
                raise ValueError(
                    f"NeighbourhoodBatchSampler: the neighbour table must exclude the item itself, but "
                    f"rows {own[:5].tolist()} list their own index"
                )
        return table

    @property
    def neighbours(self) -> Tensor:
        """The latest neighbour table (N, width), int64 on the CPU."""
        return self._neighbours

    @property
    def num_items(self) -> int:
        return self._neighbours.shape[0]

    def set_neighbours(self, neighbours: Tensor) -> None:
        """Replace the neighbour table (after a bank refresh); used from the next epoch start on.

        The new table must have the same number of rows N as the current one.
        """
        self._neighbours = self._validated(neighbours, expected_items=self.num_items)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one restarts at its first batch."""
        check_int("epoch", epoch, 0, where=_NBS)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._epoch_neighbours = None

    @property
    def batches_per_round(self) -> int:
        """Batches of one permutation of the seeds: N // (B/k) with ``drop_last``, else ceil(N / (B/k))."""
        n, s = self.num_items, self.seeds_per_batch
        return n // s if self.drop_last else -(-n // s)

    def __len__(self) -> int:
        """Batches per epoch: one round's (:attr:`batches_per_round`), or ``min_batches`` when more."""
        return max(self.batches_per_round, self.min_batches or 0)

    # -- batch construction -------------------------------------------------------------------------

    def epoch_seeds(self, epoch: int) -> Tensor:
        """The (num_batches, B/k) seeds of every global batch of ``epoch``: rounds of permutations
        from the (seed, epoch) generator, each cut into :attr:`batches_per_round` groups."""
        generator = _epoch_generator(self.seed, epoch)
        per_round, s = self.batches_per_round, self.seeds_per_batch
        needed = per_round * s
        rounds = []
        for _ in range(-(-len(self) // per_round)):
            perm = torch.randperm(self.num_items, generator=generator)
            if needed > perm.numel():  # drop_last=False: complete the last group from the start
                perm = torch.cat([perm, perm[: needed - perm.numel()]])
            rounds.append(perm[:needed].view(per_round, s))
        return torch.cat(rounds)[: len(self)]

    def global_batches(self, epoch: int, neighbours: Tensor | None = None) -> Tensor:
        """All global batches of ``epoch`` as a (num_batches, B) int64 tensor (before the rank slice)."""
        table = self._neighbours if neighbours is None else neighbours
        seeds = self.epoch_seeds(epoch)
        nbrs = self._distinct_neighbours(seeds, table) if self.avoid_duplicates else table[seeds, : self.k - 1]
        return torch.cat([seeds.unsqueeze(2), nbrs], dim=2).reshape(len(self), self.batch_size)

    def _distinct_neighbours(self, seeds: Tensor, table: Tensor) -> Tensor:
        """(G, S, k-1) neighbours avoiding repeats within each batch (see the class docstring).

        Vectorised over all G batches of the epoch; the loop runs over the S seed positions because
        seed s may only take what seeds before it left.
        """
        g, s = seeds.shape
        need = self.k - 1
        candidates = table[seeds]  # (G, S, W)
        width = candidates.shape[2]
        columns = torch.arange(width)
        earlier_column = columns.unsqueeze(1) > columns.unsqueeze(0)  # [j, j'] = j' < j
        taken = seeds  # (G, M): the batch's members so far, all seeds reserved up front
        chosen = torch.empty(g, s, need, dtype=torch.int64)
        for position in range(s):
            row = candidates[:, position]  # (G, W)
            in_batch = (row.unsqueeze(2) == taken.unsqueeze(1)).any(dim=2)
            repeat_in_row = ((row.unsqueeze(2) == row.unsqueeze(1)) & earlier_column).any(dim=2)
            usable = ~(in_batch | repeat_in_row)
            # Usable entries first, each group in table order; keep the first k-1.
            order = torch.argsort((~usable).long() * width + columns, dim=1)[:, :need]
            chosen[:, position] = row.gather(1, order)
            taken = torch.cat([taken, chosen[:, position]], dim=1)
        return chosen

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's slice of each remaining global batch of the current epoch.

        Continues from ``position`` when an epoch is in progress; otherwise (fresh or finished
        epoch) starts the epoch from its first batch with the latest neighbour table.
        """
        if not 0 < self.position < len(self) or self._epoch_neighbours is None:
            self.position = 0
            self._epoch_neighbours = self._neighbours
        per_rank = self.batch_size // self.world_size
        batches = self.global_batches(self.epoch, self._epoch_neighbours)
        mine = batches[self.position :, self.rank * per_rank : (self.rank + 1) * per_rank]
        if self.items is not None:  # table positions -> data set indices
            mine = self.items[mine]
        for batch in mine.tolist():
            self.position += 1
            yield batch

    # -- resume -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position within it and neighbour tables; enough for an exact mid-epoch resume."""
        in_progress = 0 < self.position < len(self)
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "k": self.k,
            "drop_last": self.drop_last,
            "avoid_duplicates": self.avoid_duplicates,
            "min_batches": self.min_batches,
            "neighbours": self._neighbours.clone(),
            "epoch_neighbours": self._epoch_neighbours.clone() if in_progress else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; world size and rank may differ from the saving run's.

        Raises:
            ValueError: missing keys, a sampling configuration (seed, batch_size, k, drop_last,
                avoid_duplicates, min_batches) different from this sampler's, an invalid epoch or
                position, or a table with another number of items N.
        """
        keys = ("epoch", "position", "seed", "batch_size", "k", "drop_last", "avoid_duplicates", "neighbours")
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"NeighbourhoodBatchSampler.load_state_dict: state lacks {missing}")
        state = {"min_batches": None, **state}  # a state saved before min_batches existed: one round
        for key in ("seed", "batch_size", "k", "drop_last", "avoid_duplicates", "min_batches"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"NeighbourhoodBatchSampler.load_state_dict: saved {key}={state[key]!r} differs "
                    f"from this sampler's {key}={getattr(self, key)!r}"
                )
        neighbours = self._validated(state["neighbours"], expected_items=self.num_items)
        epoch_table = state.get("epoch_neighbours")
        if epoch_table is not None:
            epoch_table = self._validated(epoch_table, expected_items=self.num_items)
        epoch, position = state["epoch"], state["position"]
        check_int("epoch", epoch, 0, where=_NBS)
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= len(self):
            raise ValueError(
                f"NeighbourhoodBatchSampler.load_state_dict: position must be an integer in "
                f"[0, {len(self)}], got {position!r}"
            )
        self.epoch = epoch
        self.position = position
        self._neighbours = neighbours
        if 0 < position < len(self):
            self._epoch_neighbours = epoch_table if epoch_table is not None else neighbours
        else:
            self._epoch_neighbours = None


# --------------------------------------------------------------------------------------------------
# Class-balanced batch sampler (the supervised ceiling)
# --------------------------------------------------------------------------------------------------


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of B = (B/m)·m indices: B/m distinct random classes, m random images of each.

    The sampling of pytorch-metric-learning's ``MPerClassSampler`` (with ``batch_size``): for every
    batch the classes are a fresh random choice, and a class's m images are drawn without
    replacement when it has at least m, with replacement otherwise. Unlike it, the randomness comes
    from a CPU generator seeded by (seed, epoch), not NumPy's global state, so batches are the same
    on every rank (each yields its contiguous slice, as :class:`NeighbourhoodBatchSampler`) and an
    epoch can be replayed exactly on resume. An epoch has ``N // B`` batches (about as many images
    as the data set holds), like the neighbourhood sampler's epochs, or ``min_batches`` when more
    (every batch is a fresh draw, so an epoch may hold any number).

    Args:
        labels: (N,) class labels (only items with a label >= 0 are drawn).
        batch_size: B, the global batch size; divisible by m and by world_size.
        m: images per class in a batch.
        seed: non-negative base seed.
        rank, world_size: this process's rank and the number of processes (DDP).
        items: (N,) data set indices of the labels' rows (e.g. the readable images); None: 0..N-1.
        min_batches: the fewest batches an epoch yields (None: ``N // B``, at least 1).

    Raises:
        ValueError: an option out of range, or fewer than B/m classes.
    """

    def __init__(
        self,
        labels: Tensor | np.ndarray,
        batch_size: int,
        m: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        items: Tensor | None = None,
        min_batches: int | None = None,
    ) -> None:
        name = "ClassBalancedBatchSampler"
        self.batch_size = check_int("batch_size", batch_size, 1, where=_CBS)
        self.min_batches = None if min_batches is None else check_int("min_batches", min_batches, 0, where=_CBS)
        self.m = check_int("m", m, 1, where=_CBS)
        self.seed = check_int("seed", seed, 0, where=_CBS)
        self.world_size = check_int("world_size", world_size, 1, where=_CBS)
        self.rank = check_int("rank", rank, 0, where=_CBS)
        if batch_size % m or batch_size % world_size or rank >= world_size:
            raise ValueError(
                f"{name}: batch_size ({batch_size}) must be divisible by m ({m}) and world_size ({world_size}), "
                f"and rank ({rank}) < world_size"
            )
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64).flatten()
        self.items = torch.arange(y.numel()) if items is None else torch.as_tensor(items, dtype=torch.int64).cpu()
        if self.items.numel() != y.numel():
            raise ValueError(f"{name}: items must hold one index per label, got {self.items.numel()} for {y.numel()}")
        keep = y >= 0
        y, self.items = y[keep], self.items[keep]
        classes, counts = torch.unique(y, return_counts=True)
        self.classes_per_batch = batch_size // m
        if classes.numel() < self.classes_per_batch:
            raise ValueError(
                f"{name}: a batch of {batch_size} with {m} images per class needs {self.classes_per_batch} classes; "
                f"the labels have {classes.numel()}"
            )
        order = torch.argsort(y, stable=True)
        self._members = self.items[order]  # items grouped by class
        self._starts = torch.cumsum(counts, 0) - counts
        self._counts = counts
        self.num_items = int(y.numel())
        self.epoch = 0

    def __len__(self) -> int:
        return max(1, self.num_items // self.batch_size, self.min_batches or 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, 0, where=_CBS)

    def global_batches(self, epoch: int) -> Tensor:
        """All global batches of ``epoch`` as a (num_batches, B) tensor of data set indices."""
        generator = _epoch_generator(self.seed, epoch)
        n_batches, c, m = len(self), self.classes_per_batch, self.m
        n_classes = self._counts.numel()
        chosen = torch.argsort(torch.rand(n_batches, n_classes, generator=generator), dim=1)[:, :c]  # (G, c)
        counts = self._counts[chosen]  # (G, c)
        # m draws per class: a random permutation prefix where the class has >= m images (no
        # replacement), uniform draws with replacement otherwise
        width = max(int(self._counts.max()), m)
        keys = torch.rand(n_batches, c, width, generator=generator)
        positions = torch.arange(width).expand_as(keys)
        keys = torch.where(positions < counts.unsqueeze(2), keys, 2.0)  # positions past the class's size last
        without = torch.argsort(keys, dim=2)[:, :, :m]
        draws = torch.rand(n_batches, c, m, generator=generator)
        with_replacement = (draws * counts.unsqueeze(2)).long().clamp_max(counts.unsqueeze(2) - 1)
        offset = torch.where((counts >= m).unsqueeze(2), without, with_replacement)
        picked = self._members[self._starts[chosen].unsqueeze(2) + offset]
        return picked.reshape(n_batches, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.world_size
        batches = self.global_batches(self.epoch)[:, self.rank * per_rank : (self.rank + 1) * per_rank]
        yield from batches.tolist()
