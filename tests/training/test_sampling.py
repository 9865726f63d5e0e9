"""Tests of plmetric.training.sampling: EMA teacher, memory bank, neighbourhood batch sampler."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from plmetric.training.sampling import MemoryBank, NeighbourhoodBatchSampler, ema_update, make_teacher

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def _trained_pair() -> tuple[nn.Module, nn.Module]:
    """A teacher and a student that differ in every parameter and BatchNorm buffer."""
    student = _net()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()
    for _ in range(3):  # moves running_mean / running_var / num_batches_tracked
        student(torch.randn(16, 6) * 2 + 1)
    return teacher, student


def _state64(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: t.detach().clone().double() if t.is_floating_point() else t.detach().clone()
        for name, t in module.state_dict().items()
    }


def _random_unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _filled_bank(x: np.ndarray, rng: np.random.Generator, batch: int = 7) -> MemoryBank:
    """A bank filled from x in random order, in several update calls."""
    bank = MemoryBank(x.shape[0], x.shape[1])
    order = torch.from_numpy(rng.permutation(x.shape[0]))
    for chunk in order.split(batch):
        bank.update(chunk, torch.from_numpy(x[chunk.numpy()]).float())
    return bank


def _reference_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64: (indices, similarities) of the k most similar other rows."""
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def _table(n: int, width: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return _filled_bank(_random_unit(n, 4, rng), rng).neighbours(width)


def _groups(batch: list[int], k: int) -> list[list[int]]:
    return [batch[i : i + k] for i in range(0, len(batch), k)]


# --------------------------------------------------------------------------------------------------
# EMA teacher
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffers", ["ema", "copy"])
def test_ema_update_matches_plain_reference(buffers):
    teacher, student = _trained_pair()
    t0, s0 = _state64(teacher), _state64(student)
    m = 0.9
    ema_update(teacher, student, m, buffers=buffers)
    t1 = teacher.state_dict()
    param_names = {name for name, _ in teacher.named_parameters()}
    for name, before in t0.items():
        if name.endswith("num_batches_tracked"):
            expected = s0[name]
            assert torch.equal(t1[name], expected), name
            continue
        averaged = name in param_names or buffers == "ema"
        expected = m * before + (1 - m) * s0[name] if averaged else s0[name]
        assert not torch.allclose(before, s0[name]), f"{name}: test setup should make them differ"
        torch.testing.assert_close(t1[name].double(), expected, rtol=1e-6, atol=1e-6, msg=name)


def test_ema_update_momentum_zero_copies_and_one_keeps():
    teacher, student = _trained_pair()
    before = _state64(teacher)
    ema_update(teacher, student, 1.0)
    for name, value in teacher.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue  # always copied from the student
        assert torch.equal(value.double(), before[name]), name
    ema_update(teacher, student, 0.0)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, student.state_dict()[name]), name


def test_make_teacher_is_frozen_independent_copy():
    teacher, student = _trained_pair()
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    ema_update(teacher, student, 0.5)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    out = teacher(torch.randn(4, 6))
    assert out.grad_fn is None
    # separate storage: changing the student leaves the teacher alone
    snapshot = _state64(teacher)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    assert torch.equal(teacher[0].weight.double(), snapshot["0.weight"])


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), "high"])
def test_ema_update_rejects_bad_momentum(momentum):
    teacher, student = _trained_pair()
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, momentum)


def test_ema_update_rejects_mismatched_architectures():
    student = _net()
    with pytest.raises(ValueError, match=r"'0.weight'.*mismatched"):
        ema_update(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)), student, 0.9)
    with pytest.raises(ValueError, match="only in student"):
        ema_update(nn.Sequential(nn.Linear(6, 5)), student, 0.9)
    with pytest.raises(ValueError, match="buffers"):
        ema_update(make_teacher(student), student, 0.9, buffers="average")


# --------------------------------------------------------------------------------------------------
# Memory bank
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 57, 500, None])
def test_bank_neighbours_match_numpy_brute_force(chunk_size):
    rng = np.random.default_rng(1)
    x = _random_unit(57, 8, rng)
    x[10] = x[3]  # exact duplicates: must be neighbours of each other, self excluded by index
    x[20] = x[3]
    x[41] = x[40]
    bank = _filled_bank(x, rng)
    k = 6
    got = bank.neighbours(k, chunk_size=chunk_size)
    assert got.shape == (57, k) and got.dtype == torch.int64
    ref_idx, ref_sims = _reference_neighbours(x, k)
    got_np = got.numpy()
    rows = np.arange(57)[:, None]
    assert not (got_np == rows).any(), "an item listed itself"
    assert all(len(set(r)) == k for r in got_np.tolist())
    sims = x @ x.T
    np.testing.assert_allclose(sims[rows, got_np], ref_sims, atol=1e-5)
    # Where the reference ranking has no near-ties, the indices must agree exactly.
    full_sorted = -np.sort(-np.where(np.eye(57, dtype=bool), -np.inf, sims), axis=1)[:, : k + 1]
    gaps = np.diff(-full_sorted, axis=1)  # gap after each rank
    unambiguous = (gaps[:, :k] > 1e-4) & np.concatenate([np.ones((57, 1), bool), gaps[:, : k - 1] > 1e-4], 1)
    assert unambiguous.mean() > 0.8
    np.testing.assert_array_equal(got_np[unambiguous], ref_idx[unambiguous])
    assert set(got_np[3, :2]) == {10, 20} and set(got_np[10, :2]) == {3, 20}
    assert got_np[40, 0] == 41 and got_np[41, 0] == 40


def test_bank_neighbours_on_a_circle():
    n = 12
    angles = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    bank = MemoryBank(n, 2)
    bank.update(torch.arange(n), torch.stack([angles.cos(), angles.sin()], 1) * 3.0)  # not unit: normalised
    got = bank.neighbours(2, chunk_size=5)
    for i in range(n):
        assert set(got[i].tolist()) == {(i - 1) % n, (i + 1) % n}
    torch.testing.assert_close(bank.embeddings.norm(dim=1), torch.ones(n))


def test_bank_update_duplicate_indices_last_write_wins():
    bank = MemoryBank(6, 3)
    emb = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [4.0, 4.0, 0]], dtype=torch.float64)
    bank.update(torch.tensor([2, 5, 2, 2]), emb)
    torch.testing.assert_close(bank.embeddings[2], torch.tensor([1.0, 1.0, 0]) / math.sqrt(2))
    torch.testing.assert_close(bank.embeddings[5], torch.tensor([0, 1.0, 0]))
    assert bank.filled.tolist() == [False, False, True, False, False, True]
    assert bank.embeddings.dtype == torch.float32
    bank.update(torch.tensor([5, 5]), torch.tensor([[0, 0, 1.0], [1.0, 0, 0]]))
    torch.testing.assert_close(bank.embeddings[5], torch.tensor([1.0, 0, 0]))


def test_bank_errors():
    with pytest.raises(ValueError, match="num_items"):
        MemoryBank(0, 3)
    with pytest.raises(ValueError, match="dim"):
        MemoryBank(3, 0)
    bank = MemoryBank(5, 3)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        bank.update(torch.tensor([0, 5]), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        bank.update(torch.tensor([-1]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="shape"):
        bank.update(torch.tensor([0, 1]), torch.ones(2, 4))
    with pytest.raises(ValueError, match="integer"):
        bank.update(torch.tensor([0.0]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="finite"):
        bank.update(torch.tensor([0]), torch.tensor([[float("nan"), 1.0, 0.0]]))
    with pytest.raises(ValueError, match="non-zero"):
        bank.update(torch.tensor([0]), torch.zeros(1, 3))
    assert not bank.filled.any(), "a rejected update must not write"
    bank.update(torch.tensor([0, 1, 2]), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"2 of 5 rows were never filled \(e\.g\. items \[3, 4\]\)"):
        bank.neighbours(2)
    bank.update(torch.tensor([3, 4]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="k must be"):
        bank.neighbours(5)
    with pytest.raises(ValueError, match="k must be"):
        bank.neighbours(0)
    with pytest.raises(ValueError, match="chunk_size"):
        bank.neighbours(2, chunk_size=0)


def test_bank_state_dict_round_trip():
    rng = np.random.default_rng(2)
    bank = _filled_bank(_random_unit(30, 5, rng), rng)
    state = bank.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    bank.update(torch.tensor([0]), torch.randn(1, 5))  # the saved copy must not change
    other = MemoryBank(30, 5)
    other.load_state_dict(loaded)
    assert torch.equal(other.embeddings, state["embeddings"]) and other.filled.all()
    assert not torch.equal(other.embeddings, bank.embeddings)
    with pytest.raises(ValueError, match=r"num_items, dim"):
        MemoryBank(31, 5).load_state_dict(loaded)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"embeddings": loaded["embeddings"]})


# --------------------------------------------------------------------------------------------------
# Neighbourhood batch sampler
# --------------------------------------------------------------------------------------------------


def test_sampler_batches_are_seeds_followed_by_their_neighbours():
    n, b, k = 50, 12, 4
    table = _table(n, 6)
    sampler = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3)
    batches = list(sampler)
    assert len(sampler) == len(batches) == n // (b // k)
    seeds = []
    for batch in batches:
        assert len(batch) == b and all(isinstance(i, int) for i in batch)
        for group in _groups(batch, k):
            seeds.append(group[0])
            assert group[1:] == table[group[0], : k - 1].tolist()
    assert len(seeds) == len(set(seeds)) == (n // (b // k)) * (b // k)


def test_sampler_epochs_and_seeds_are_reproducible():
    table = _table(40, 4)
    a = NeighbourhoodBatchSampler(table, batch_size=10, k=5, seed=7)
    epoch0 = list(a)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch0 != epoch1
    b = NeighbourhoodBatchSampler(table, batch_size=10, k=5, seed=7)
    b.set_epoch(1)
    assert list(b) == epoch1
    b.set_epoch(0)
    assert list(b) == epoch0
    assert list(b) == epoch0, "iterating a finished epoch again repeats it"
    c = NeighbourhoodBatchSampler(table, batch_size=10, k=5, seed=8)
    assert list(c) != epoch0


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_rank_slices_concatenate_to_the_single_process_batch(world_size):
    table = _table(45, 5)
    single = NeighbourhoodBatchSampler(table, batch_size=12, k=4, seed=1)
    single.set_epoch(2)
    ranks = [
        NeighbourhoodBatchSampler(table, batch_size=12, k=4, seed=1, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    for sampler in ranks:
        sampler.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    assert all(len(p) == len(single) for p in per_rank)
    for i, batch in enumerate(single):
        assert sum((p[i] for p in per_rank), []) == batch
        assert all(len(p[i]) == 12 // world_size for p in per_rank)


def test_sampler_state_dict_resumes_mid_epoch_exactly():
    table = _table(60, 6, seed=1)
    reference = NeighbourhoodBatchSampler(table, batch_size=12, k=4, seed=5)
    reference.set_epoch(3)
    full = list(reference)
    reference.set_epoch(4)
    next_epoch = list(reference)

    run = NeighbourhoodBatchSampler(table, batch_size=12, k=4, seed=5)
    run.set_epoch(3)
    iterator = iter(run)
    consumed = [next(iterator) for _ in range(6)]
    run.set_neighbours(_table(60, 6, seed=2))  # a bank refresh mid-epoch applies from the next epoch
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["epoch"] == 3 and state["position"] == 6

    resumed = NeighbourhoodBatchSampler(_table(60, 6, seed=9), batch_size=12, k=4, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's loop calls this again: must not restart the epoch
    rest = list(resumed)
    assert len(rest) == len(full) - 6
    assert consumed == full[:6]
    assert rest == [batch[6:] for batch in full[6:]]  # rank 1 of 2: second half of each batch

    resumed.set_epoch(4)
    refreshed = NeighbourhoodBatchSampler(_table(60, 6, seed=2), batch_size=12, k=4, seed=5, rank=1, world_size=2)
    refreshed.set_epoch(4)
    assert list(resumed) == list(refreshed)
    assert list(refreshed) != [batch[6:] for batch in next_epoch]


def test_sampler_keeps_duplicates_from_overlapping_neighbourhoods_by_default():
    n, k = 20, 4
    # Every item's neighbours are the smallest other indices: neighbourhoods overlap heavily.
    table = torch.stack([torch.tensor([j for j in range(n) if j != i][: k - 1]) for i in range(n)])
    sampler = NeighbourhoodBatchSampler(table, batch_size=12, k=k, seed=0)
    batches = list(sampler)
    assert any(len(set(batch)) < len(batch) for batch in batches)
    for batch in batches:
        assert len(batch) == 12
        for group in _groups(batch, k):
            assert group[1:] == table[group[0]].tolist()


def _reference_distinct_batch(seeds: list[int], table: torch.Tensor, k: int) -> list[int]:
    taken, out = list(seeds), []
    for seed in seeds:
        row = table[seed].tolist()
        ok = [j not in taken and j not in row[:c] for c, j in enumerate(row)]
        usable = [j for j, good in zip(row, ok, strict=True) if good]
        skipped = [j for j, good in zip(row, ok, strict=True) if not good]
        pick = (usable + skipped)[: k - 1]
        out += [seed] + pick
        taken += pick
    return out


@pytest.mark.parametrize("width", [3, 5, 12])
def test_sampler_avoid_duplicates_takes_next_neighbours(width):
    n, b, k = 40, 20, 4
    table = _table(n, width, seed=4)
    sampler = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=2, avoid_duplicates=True)
    sampler.set_epoch(1)
    batches = list(sampler)
    seeds = sampler.epoch_seeds(1).tolist()
    assert batches == [_reference_distinct_batch(s, table, k) for s in seeds]
    if width == 12:
        assert all(len(set(batch)) == b for batch in batches)
    plain = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=2)
    plain.set_epoch(1)
    plain_batches = list(plain)
    assert any(len(set(batch)) < b for batch in plain_batches), "test data should overlap"
    assert [batch[::k] for batch in plain_batches] == [batch[::k] for batch in batches]


def test_sampler_without_drop_last_completes_the_last_batch():
    n, b, k = 23, 15, 5  # 3 seeds per batch, 23 = 7 * 3 + 2
    sampler = NeighbourhoodBatchSampler(_table(n, 4), batch_size=b, k=k, seed=0, drop_last=False)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 8
    assert all(len(batch) == b for batch in batches)
    seeds = [i for batch in batches for i in batch[::k]]
    assert set(seeds) == set(range(n)) and len(seeds) == 24
    assert len(set(batches[-1][::k])) == 3
    assert len(NeighbourhoodBatchSampler(_table(n, 4), batch_size=b, k=k)) == 7


def test_sampler_draws_further_rounds_of_seeds_when_an_epoch_needs_more_batches():
    """min_batches above one round (a small pile under train.min_steps): further permutations from
    the same (seed, epoch) generator, the first round the plain epoch's, each round's seeds every
    item at most once; the epoch stays reproducible and resumes exactly in any round."""
    n, b, k = 30, 10, 5  # 2 seeds per batch: 15 batches a round
    table = _table(n, 4, seed=4)
    plain = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3)
    plain.set_epoch(2)
    one_round = list(plain)
    sampler = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3, min_batches=40)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert sampler.batches_per_round == 15 and len(sampler) == len(batches) == 40
    assert batches[:15] == one_round  # the first round is the plain epoch's
    seeds = [batch[::k] for batch in batches]
    rounds = [sum(seeds[i : i + 15], []) for i in (0, 15, 30)]
    assert sorted(rounds[0]) == sorted(rounds[1]) == list(range(n))  # every item once a round
    assert len(set(rounds[2])) == len(rounds[2]) == 20  # the last round cut short
    assert rounds[0] != rounds[1]
    for batch in batches:
        for group in _groups(batch, k):
            assert group[1:] == table[group[0], : k - 1].tolist()
    again = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3, min_batches=40)
    again.set_epoch(2)
    assert list(again) == batches
    again.set_epoch(3)
    assert list(again) != batches
    # at most one round's batches: exactly the plain epoch
    fewer = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3, min_batches=15)
    fewer.set_epoch(2)
    assert list(fewer) == one_round
    # DDP slices and an exact resume in the second round
    halves = []
    for r in (0, 1):
        part = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3, min_batches=40, rank=r, world_size=2)
        part.set_epoch(2)
        halves.append(list(part))
    assert [x + y for x, y in zip(*halves, strict=True)] == batches
    run = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3, min_batches=40)
    run.set_epoch(2)
    iterator = iter(run)
    consumed = [next(iterator) for _ in range(22)]
    state = run.state_dict()
    assert state["position"] == 22 and state["min_batches"] == 40
    resumed = NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3, min_batches=40)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert consumed + list(resumed) == batches
    with pytest.raises(ValueError, match="min_batches=40 differs"):
        NeighbourhoodBatchSampler(table, batch_size=b, k=k, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="min_batches must be an integer >= 0"):
        NeighbourhoodBatchSampler(table, batch_size=b, k=k, min_batches=-1)
    # drop_last=False: each round completes its last group from its own permutation
    ragged = NeighbourhoodBatchSampler(_table(23, 4), batch_size=15, k=5, seed=0, drop_last=False, min_batches=16)
    assert ragged.batches_per_round == 8 and len(list(ragged)) == 16
    second = [i for batch in list(ragged)[8:] for i in batch[::5]]
    assert set(second) == set(range(23)) and len(second) == 24


def test_sampler_works_as_dataloader_batch_sampler():
    table = _table(30, 4)
    sampler = NeighbourhoodBatchSampler(table, batch_size=10, k=5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(30)), batch_sampler=sampler)
    assert [batch[0].tolist() for batch in loader] == list(sampler)


def test_sampler_errors_name_the_option():
    table = _table(20, 4)
    with pytest.raises(ValueError, match=r"batch_size \(10\) must be divisible by k \(4\)"):
        NeighbourhoodBatchSampler(table, batch_size=10, k=4)
    with pytest.raises(ValueError, match=r"k - 1 \(5\) exceeds the neighbour table's width \(4\)"):
        NeighbourhoodBatchSampler(table, batch_size=12, k=6)
    small = torch.tensor([[1, 2, 1], [0, 2, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"k \(4\) exceeds the number of items N \(3\)"):
        NeighbourhoodBatchSampler(small, batch_size=4, k=4)
    with pytest.raises(ValueError, match=r"batch_size \(12\) must be divisible by world_size \(5\)"):
        NeighbourhoodBatchSampler(table, batch_size=12, k=4, world_size=5)
    with pytest.raises(ValueError, match=r"rank \(2\) must be < world_size \(2\)"):
        NeighbourhoodBatchSampler(table, batch_size=12, k=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seeds per batch"):
        NeighbourhoodBatchSampler(table, batch_size=84, k=4)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        NeighbourhoodBatchSampler(table, batch_size=12, k=4, seed=-1)
    with pytest.raises(ValueError, match="exclude the item itself"):
        NeighbourhoodBatchSampler(torch.arange(20).unsqueeze(1).repeat(1, 3), batch_size=12, k=4)
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        NeighbourhoodBatchSampler(table + 1, batch_size=12, k=4)
    with pytest.raises(ValueError, match="2-D integer"):
        NeighbourhoodBatchSampler(table.float(), batch_size=12, k=4)
    sampler = NeighbourhoodBatchSampler(table, batch_size=12, k=4)
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)
    with pytest.raises(ValueError, match=r"N = 20"):
        sampler.set_neighbours(_table(21, 4))
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=r"saved k=4 differs"):
        NeighbourhoodBatchSampler(table, batch_size=12, k=3).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        sampler.load_state_dict({**state, "position": 99})


# --------------------------------------------------------------------------------------------------
# Unreadable items: a bank with holes, a sampler on the readable rows only
# --------------------------------------------------------------------------------------------------


def test_bank_neighbours_among_some_rows_are_positions_of_those_rows():
    """12 points on an arc at irregular angles (no ties), rows 3 and 7 never filled: the neighbours of
    each readable point are its nearest *readable* points on the arc, given as positions in ``rows``."""
    n = 12
    steps = torch.arange(n, dtype=torch.float64)
    angles = 0.3 * steps + 0.01 * steps**2  # 0 .. 4.51 rad: no wrap-around, distinct gaps
    points = torch.stack([angles.cos(), angles.sin()], 1)
    rows = torch.tensor([i for i in range(n) if i not in (3, 7)])
    bank = MemoryBank(n, 2)
    bank.update(rows, points[rows])
    with pytest.raises(ValueError, match="2 of 12 rows were never filled"):
        bank.neighbours(2)
    table = bank.neighbours(2, rows=rows)
    assert table.shape == (10, 2)
    readable = rows.tolist()
    for position, item in enumerate(readable):
        others = [j for j in readable if j != item]
        nearest = sorted(others, key=lambda j: abs(float(angles[j] - angles[item])))[:2]
        assert set(rows[table[position]].tolist()) == set(nearest), item


def test_sampler_with_items_yields_only_those_items_and_the_same_batches_in_their_numbering():
    rng = np.random.default_rng(0)
    items = torch.tensor(sorted(rng.choice(50, size=30, replace=False).tolist()))
    table = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i))[:4] for i in range(30)])
    table = torch.where(table == torch.arange(30).unsqueeze(1), (table + 1) % 30, table)
    plain = NeighbourhoodBatchSampler(table, batch_size=10, k=5, seed=3)
    mapped = NeighbourhoodBatchSampler(table, batch_size=10, k=5, seed=3, items=items)
    plain_batches, mapped_batches = list(plain), list(mapped)
    assert len(mapped_batches) == len(plain_batches) == len(mapped) > 0
    for p, m in zip(plain_batches, mapped_batches, strict=True):
        assert m == items[torch.tensor(p)].tolist()
    assert set(sum(mapped_batches, [])) <= set(items.tolist())
    with pytest.raises(ValueError, match="items must hold 30 distinct indices"):
        NeighbourhoodBatchSampler(table, batch_size=10, k=5, items=items[:29])
    with pytest.raises(ValueError, match="items must hold 30 distinct indices"):
        NeighbourhoodBatchSampler(table, batch_size=10, k=5, items=torch.zeros(30, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# Class-balanced batches (the supervised ceiling)
# --------------------------------------------------------------------------------------------------


def test_class_balanced_batches_hold_m_distinct_images_of_b_over_m_distinct_classes():
    from plmetric.training.sampling import ClassBalancedBatchSampler

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), rng.integers(6, 15, 12))
    labels[:3] = 99  # a class with 3 images (< m): drawn with replacement
    labels[5] = -1  # unlabelled: never drawn
    sampler = ClassBalancedBatchSampler(labels, batch_size=20, m=5, seed=1)
    batches = list(sampler)
    assert len(batches) == len(labels) // 20
    seen_classes = set()
    for batch in batches:
        assert len(batch) == 20 and 5 not in batch
        groups = [batch[i : i + 5] for i in range(0, 20, 5)]
        classes = [set(labels[g].tolist()) for g in groups]
        assert all(len(c) == 1 for c in classes) and len({c.pop() for c in classes}) == 4
        for g in groups:
            if labels[g[0]] != 99:
                assert len(set(g)) == 5  # without replacement where the class has >= m images
        seen_classes |= set(labels[batch].tolist())
    assert len(seen_classes) >= 10
    again = ClassBalancedBatchSampler(labels, batch_size=20, m=5, seed=1)
    assert list(again) == batches
    again.set_epoch(1)
    assert list(again) != batches
    halves = [list(ClassBalancedBatchSampler(labels, 20, 5, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves, strict=True)] == batches
    # an epoch that needs more batches (train.min_steps) gets them, each a fresh draw
    more = ClassBalancedBatchSampler(labels, batch_size=20, m=5, seed=1, min_batches=3 * len(batches))
    assert len(more) == len(list(more)) == 3 * len(batches)
    assert len(ClassBalancedBatchSampler(labels, batch_size=20, m=5, seed=1, min_batches=1)) == len(batches)


def test_class_balanced_sampler_maps_items_and_checks_its_options():
    from plmetric.training.sampling import ClassBalancedBatchSampler

    labels = np.repeat(np.arange(4), 6)
    items = torch.arange(100, 124)
    batches = list(ClassBalancedBatchSampler(labels, 8, 2, items=items))
    assert all(100 <= i < 124 for b in batches for i in b)
    with pytest.raises(ValueError, match="needs 5 classes; the labels have 4"):
        ClassBalancedBatchSampler(labels, 10, 2)
    with pytest.raises(ValueError, match="divisible by m"):
        ClassBalancedBatchSampler(labels, 9, 2)


@pytest.mark.skipif(not __import__("plmetric.manifold.ann", fromlist=["x"]).faiss_available(), reason="faiss not installed")
def test_a_large_bank_takes_its_neighbour_table_from_faiss_hnsw():
    """From ``approximate_above`` rows the table comes from plmetric.manifold.ann.knn_table (HNSW): never a
    row itself, k distinct neighbours, recall of the exact table ≥ 0.95 on planted groups."""
    from point_sets import planted_duplicates

    from plmetric.manifold import ann
    x = planted_duplicates(n=3000, d=32)
    bank = MemoryBank(len(x), x.shape[1])
    bank.update(torch.arange(len(x)), x)
    exact = bank.neighbours(5, approximate_above=None)
    approx = bank.neighbours(5, approximate_above=1000)
    assert approx.shape == exact.shape and not (approx == torch.arange(len(x))[:, None]).any()
    assert all(len(set(row)) == 5 for row in approx.tolist())
    recall = (approx[:, :, None] == exact[:, None, :]).any(2).float().mean()
    assert recall >= 0.95, float(recall)
    # the library default keeps small banks exact (and exactly reproducible)
    assert torch.equal(bank.neighbours(5), exact)
    assert bank.neighbours(5, approximate_above=10_000).equal(exact)
    # rows the approximate search could not fill are recomputed exactly (an IVF of tiny cells)
    tiny = ann.knn_table(torch.as_tensor(x[:200]), 5, ann.AnnPlan("ivf", {"nlist": 50, "nprobe": 1, "trained_on": 200}))
    assert (tiny >= 0).all() and not (tiny == torch.arange(200)[:, None]).any()
