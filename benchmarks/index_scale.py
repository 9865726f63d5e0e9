"""Search indexes by size: exact torch search against faiss flat, IVF and HNSW (plmetric.manifold.ann).

Data: 512-d L2-normalised vectors in groups of planted near-duplicates: ``n / group`` centres,
each with ``group`` members ``normalize(centre + noise)`` (``--noise``, the noise norm: 1.0 gives
members a cosine of about 0.5 to each other); the centres lie around ``sqrt(n / group)`` random
topics (``--topic-noise`` 1.0: two centres of a topic have a cosine of about 0.5), so members of
other groups of the same topic crowd a query's neighbourhood at a cosine of about 0.25.
Queries are noisy copies (``--query-noise``) of random database vectors, so the exact top 10 of a
query is its source and the source's group. (On structureless uniform vectors every neighbour
after the first is at noise level and recall@10 of any approximate index means nothing.)

Per size and index kind, each in its own child process: build time; peak resident memory above
the loaded data (``/proc/self/status`` VmHWM after a reset through ``/proc/self/clear_refs``; faiss
allocates outside Python, where tracemalloc cannot see); size on disk (exact: the embeddings
file; faiss: the .faiss file, written beside the embeddings); the latency of one query (median of
``--single-queries``) and of a batch of ``--batch`` queries (per query); recall@10 against the
exact search; the share of queries whose top-1 is their source. Also the trainer's neighbour table
(``MemoryBank.neighbours``: the k nearest other rows of every bank row) exact with torch and, as
an option for large banks, through faiss (flat, HNSW), with the recall of HNSW's table on a
sample of rows.

``--only neighbours`` measures ``plmetric neighbours`` instead (issue 22):
``plmetric.retrieval.neighbours.nearest_others`` over every row (k = ``--k``, itself excluded)
through an HNSW index of the default plan (build and neighbour pass timed separately, peak resident
memory above the loaded data as above), its recall@k on ``--neighbours-sample`` rows against the
exact ``nearest_others(..., rows=sample)``, and, in a second child, the exact path (no faiss) on the
first ``--neighbours-exact-rows`` rows: its time, extrapolated linearly to all N rows (each row costs
one N-long block product), and its peak memory (its blocks hold ``BLOCK_ELEMENTS`` floats whatever N).

``ivfpq`` (issue 31: IVF with 4-bit product-quantised codes, chosen and sized by ``plan_index`` from n, d and
its memory budget) is built as an index too large for memory would be: trained on the rows of
``ann.training_rows`` (read in one pass over the file), then filled by ``ann.add_vectors`` block by block
(``--block-rows``); its candidates are re-ranked exactly from the database file, memory-mapped. Its rows add
``rerank_disk_mib`` (the vectors kept as float16 beside the index for re-ranking), ``params``, an ``nprobe``
and ``rerank`` sweep, and ``add_s`` / ``add_count``: the time to add ``--add-count`` further vectors (default
n / 10) to the built index without retraining, as ``plmetric index --add-to`` does.

From ``--blockwise-from`` vectors (default 2M: 4 GiB of float32 at 512-d) the data never is in memory whole:
the planted vectors are generated block by block into a float16 ``.npy`` file (``np.lib.format.open_memmap``,
in the temporary folder: 10 GiB at 10M x 512; ``TMPDIR`` picks the disk), the exact ground truth and the
``exact`` row are a blockwise top-k over that file (the row says ``"blockwise": true``; its single-query time
is the median of at most 3), and only ``exact`` and ``ivfpq`` run (the other kinds and the neighbour tables
need every vector in memory). Each long step prints an estimate of its time first.

    nice -n 19 python benchmarks/index_scale.py --sizes 10000 100000 --json index_scale.json
    python benchmarks/index_scale.py --sizes 10000000 --kinds exact ivfpq --skip-bank --json index_10m.json
    python benchmarks/index_scale.py --only neighbours --sizes 100000 \\
        --json benchmarks/results/neighbours_scale_cpu.json
    python benchmarks/index_scale.py            # 10k, 100k and 1M (about 2 GiB per copy of the data)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("exact", "flat", "ivf", "hnsw", "ivfpq")
#: ivfpq training time per training row and k-means iteration, microseconds, as measured on the project's
#: 2-core box shared with other jobs: 19 (load 1) to 59 (load 5) at 131k rows / 2,048 cells, 134 (load 6) at 262k / 4,096
TRAIN_US_PER_ROW_ITERATION = (19, 134)
#: kinds that run when the database is only on disk (--blockwise-from)
BLOCKWISE_KINDS = ("exact", "ivfpq")
BANK_KINDS = ("bank-torch", "bank-flat", "bank-hnsw")
NEIGHBOUR_KINDS = ("neighbours-hnsw", "neighbours-exact")
PARTS = ("indexes", "bank", "neighbours")


def planted_groups(n: int, dim: int, group: int, noise: float, topic_noise: float, seed: int) -> np.ndarray:
    """``n`` unit vectors in groups of ``group`` near-duplicates; the groups' centres lie around
    ``sqrt(n / group)`` random topic centres (noise norm ``topic_noise``), so that a query's
    neighbourhood is crowded by the other groups of its topic, as in real embeddings."""
    rng = np.random.default_rng(seed)
    groups = -(-n // group)
    topics = rng.standard_normal((max(1, round(np.sqrt(groups))), dim), dtype=np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    centres = topics[rng.integers(0, len(topics), groups)]
    centres += rng.standard_normal((groups, dim), dtype=np.float32) * np.float32(topic_noise / np.sqrt(dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, group, axis=0)[:n]
    x += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def noisy_copies(x: np.ndarray, count: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` queries, each a noisy copy of a random row of ``x``; returns (queries, sources)."""
    rng = np.random.default_rng(seed + 1)
    sources = rng.choice(len(x), size=count, replace=False)
    q = x[sources] + rng.standard_normal((count, x.shape[1]), dtype=np.float32) * np.float32(
        noise / np.sqrt(x.shape[1])
    )
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q.astype(np.float32), sources


def planted_groups_to_file(
    path: Path, n: int, dim: int, group: int, noise: float, topic_noise: float, seed: int, block_rows: int,
    what: str = "vectors",
) -> np.ndarray:
    """:func:`planted_groups`' distribution written block by block into a float16 ``.npy`` file at ``path``
    (each block's centres and noise from its own seeded generator, so memory holds one block); returns the
    file memory-mapped read-only."""
    block_rows -= block_rows % group  # whole groups in each block
    rng = np.random.default_rng(seed)
    groups = -(-n // group)
    topics = rng.standard_normal((max(1, round(np.sqrt(groups))), dim), dtype=np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    started = time.perf_counter()
    for number, start in enumerate(range(0, n, block_rows)):
        stop = min(start + block_rows, n)
        block_rng = np.random.default_rng([seed, number])
        count = -(-(stop - start) // group)
        centres = topics[block_rng.integers(0, len(topics), count)]
        centres += block_rng.standard_normal((count, dim), dtype=np.float32) * np.float32(topic_noise / np.sqrt(dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = np.repeat(centres, group, axis=0)[: stop - start]
        x += block_rng.standard_normal(x.shape, dtype=np.float32) * np.float32(noise / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:stop] = x
        if number == 0:
            _say(f"  writing {n:,} x {dim} float16 {what} ({n * dim * 2 / 2**30:.1f} GiB): about "
                 f"{(time.perf_counter() - started) * n / (stop - start):.0f} s")
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_block(database: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of an ``.npy`` memory map as float32, read through the file (the page cache)
    rather than mapped, so the rows a pass has read do not stay in this process's resident memory."""
    with open(database.filename, "rb") as f:
        f.seek(database.offset + start * database.shape[1] * database.itemsize)
        rows = np.fromfile(f, dtype=database.dtype, count=(stop - start) * database.shape[1])
    return rows.reshape(stop - start, database.shape[1]).astype(np.float32)


def blockwise_top_k(database: np.ndarray, queries: np.ndarray, k: int, block_rows: int, say: str = ""):
    """Exact top-k (scores, ids) of float32 ``queries`` over the rows of an ``.npy`` memory map, one block of
    ``block_rows`` at a time (torch matrix products; memory: one block and its score matrix)."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.full((len(q), k), -torch.inf)
    best_ids = torch.full((len(q), k), -1, dtype=torch.int64)
    n = len(database)
    started = time.perf_counter()
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        scores, ids = (q @ torch.from_numpy(read_block(database, start, stop)).T).topk(min(k, stop - start), dim=1)
        merged = torch.cat([best_scores, scores], 1).topk(k, dim=1)
        best_ids = torch.cat([best_ids, ids + start], 1).gather(1, merged.indices)
        best_scores = merged.values
        if say and start == 0 and stop < n:
            _say(f"  {say}: about {(time.perf_counter() - started) * n / stop:.0f} s")
    return best_scores, best_ids


# ----------------------------------------------------------------------------- child process


sys.path.insert(0, str(Path(__file__).resolve().parent))
# the peak-memory probes of eval_speed.py (VmHWM, reset through /proc/self/clear_refs)
from eval_speed import _proc_status_kib as _status_kib  # noqa: E402
from eval_speed import _reset_peak_rss as _reset_peak  # noqa: E402


def _exact_top(database, queries, k: int):
    import torch

    from plmetric.retrieval.index import top_k

    return top_k(torch.as_tensor(queries), database, k)


def run_kind(
    kind: str, data: Path, k: int, single: int, bank_k: int, sample: int, exact_rows: int = 0,
    args: argparse.Namespace | None = None,
) -> dict:
    """Build and query one index kind (or time one neighbour table) on the saved data."""
    import torch

    from plmetric.manifold import ann
    queries = np.load(data / "queries.npy")
    sources = np.load(data / "sources.npy")
    database = np.load(data / "database.npy", mmap_mode="r")
    blockwise = database.dtype == np.float16  # written block by block: never loaded whole
    if kind == "ivfpq" or blockwise:
        baseline = _status_kib("VmRSS")
        reset = _reset_peak()
        out = {"kind": kind, "n": len(database), "peak_reset": reset}
        if kind == "ivfpq":
            return {**out, **_ivfpq(database, queries, sources, k, single, baseline, data, args)}
        return {**out, **_blockwise_exact(database, queries, sources, k, single, baseline, data, args)}
    x = torch.from_numpy(np.load(data / "database.npy"))
    n = len(x)
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    out: dict = {"kind": kind, "n": n, "peak_reset": reset}
    if kind.startswith("bank"):
        return {**out, **_bank(kind, x, bank_k, sample, baseline)}
    if kind.startswith("neighbours"):
        return {**out, **_neighbours(kind, x, k, sample, exact_rows, baseline)}
    start = time.perf_counter()
    plan, index = None, None
    if kind != "exact":
        plan = ann.plan_index(n, kind=kind)
        index = ann.build_index(x, plan)
        out["params"] = plan.params
    out["build_s"] = time.perf_counter() - start
    out["peak_rss_delta_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    with tempfile.TemporaryDirectory(dir=data) as tmp:
        if index is None:
            from safetensors.torch import save_file

            path = Path(tmp) / "e.safetensors"
            save_file({"embeddings": x, "labels": torch.full((n,), -1)}, str(path))
        else:
            path = Path(tmp) / "e.faiss"
            path.write_bytes(ann.serialize_index(index))
        out["disk_mib"] = path.stat().st_size / 2**20

    def search(q):
        if index is None:
            return _exact_top(x, q, k)
        return ann.search_index(index, q, k, plan)

    times = []
    for row in range(single):
        start = time.perf_counter()
        search(queries[row : row + 1])
        times.append(time.perf_counter() - start)
    out["one_query_ms"] = 1000 * statistics.median(times)
    start = time.perf_counter()
    _, ids = search(queries)
    out["batch_query_ms"] = 1000 * (time.perf_counter() - start) / len(queries)
    out["top1_is_source"] = float((ids[:, 0].numpy() == sources).mean())
    np.save(data / f"ids_{kind}.npy", ids.numpy())
    if kind in ("ivf", "hnsw") and (data / "ids_exact.npy").exists():
        out["sweep"] = _sweep(index, plan, queries, k, np.load(data / "ids_exact.npy"))
    return out


def _blockwise_exact(database, queries, sources, k: int, single: int, baseline: int, data: Path, args) -> dict:
    """The exact search over a database on disk: blockwise top-k (the ground truth of the other kinds)."""
    n, dim = database.shape
    out: dict = {"blockwise": True, "build_s": 0.0, "peak_rss_delta_mib": (_status_kib("VmHWM") - baseline) / 1024}
    out["disk_mib"] = n * dim * database.itemsize / 2**20
    times = []
    for row in range(min(single, 3)):
        start = time.perf_counter()
        blockwise_top_k(database, queries[row : row + 1], k, args.block_rows, "one query" if row == 0 else "")
        times.append(time.perf_counter() - start)
    out["one_query_ms"] = 1000 * statistics.median(times)
    out["single_queries"] = len(times)
    start = time.perf_counter()
    _, ids = blockwise_top_k(database, queries, k, args.block_rows, f"exact top-{k} of {len(queries):,} queries")
    out["batch_query_ms"] = 1000 * (time.perf_counter() - start) / len(queries)
    out["top1_is_source"] = float((ids[:, 0].numpy() == sources).mean())
    out["peak_rss_delta_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    np.save(data / "ids_exact.npy", ids.numpy())
    return out


def _ivfpq(database, queries, sources, k: int, single: int, baseline: int, data: Path, args) -> dict:
    """ivfpq built as for a database that does not fit in memory: trained on ``ann.training_rows`` (one pass
    over the file), filled block by block, searched with exact re-ranking from the memory-mapped file."""
    from plmetric.manifold import ann

    n, dim = database.shape
    block_rows = args.block_rows
    plan = ann.plan_index(n, kind="ivfpq", dim=dim)
    out: dict = {"params": plan.params, "faiss_threads": ann.import_faiss().omp_get_max_threads()}
    start = time.perf_counter()
    rows = ann.training_rows(n, plan)
    if len(rows) == n:
        sample = np.concatenate([read_block(database, a, min(a + block_rows, n)) for a in range(0, n, block_rows)])
    else:  # one pass over the file, keeping the sampled rows of each block
        sample = np.empty((len(rows), dim), dtype=np.float32)
        taken = 0
        for first in range(0, n, block_rows):
            last = min(first + block_rows, n)
            inside = rows[(rows >= first) & (rows < last)]
            if len(inside):
                sample[taken : taken + len(inside)] = read_block(database, first, last)[inside - first]
                taken += len(inside)
    out["sample_s"] = time.perf_counter() - start
    low, high = (TRAIN_US_PER_ROW_ITERATION[0] * len(rows) * ann.IVFPQ_KMEANS_ITERATIONS / 1e6,
                 TRAIN_US_PER_ROW_ITERATION[1] * len(rows) * ann.IVFPQ_KMEANS_ITERATIONS / 1e6)
    _say(f"  training {plan.params['factory']} on {len(rows):,} rows ({plan.params['nlist']:,} cells, "
         f"{ann.IVFPQ_KMEANS_ITERATIONS} k-means iterations): about {low:.0f}-{high:.0f} s")
    start = time.perf_counter()
    index = ann.train_index(sample, plan, dim)
    out["train_s"] = time.perf_counter() - start
    out["train_rows"] = len(rows)
    del sample
    _say(f"  trained in {out['train_s']:.0f} s")
    start = time.perf_counter()
    for first in range(0, n, block_rows):
        ann.add_vectors(index, read_block(database, first, min(first + block_rows, n)))
        if first == 0 and block_rows < n:
            _say(f"  adding {n:,} vectors in blocks of {block_rows:,}: about "
                 f"{(time.perf_counter() - start) * n / block_rows:.0f} s")
    out["add_all_s"] = time.perf_counter() - start
    out["build_s"] = out["sample_s"] + out["train_s"] + out["add_all_s"]
    out["peak_rss_delta_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    with tempfile.TemporaryDirectory(dir=data) as tmp:
        path = Path(tmp) / "e.faiss"
        ann.import_faiss().write_index(index, str(path))  # no in-memory copy of the serialised index
        out["disk_mib"] = path.stat().st_size / 2**20
    out["rerank_disk_mib"] = n * dim * 2 / 2**20  # the vectors kept beside it as float16 for re-ranking

    def vectors(ids: np.ndarray) -> np.ndarray:
        return np.asarray(database[ids], dtype=np.float32)

    def search(q, **overrides):
        return ann.search_index(index, q, k, plan, vectors=vectors, **overrides)

    times = []
    for row in range(single):
        start = time.perf_counter()
        search(queries[row : row + 1])
        times.append(time.perf_counter() - start)
    out["one_query_ms"] = 1000 * statistics.median(times)
    start = time.perf_counter()
    _, ids = search(queries)
    out["batch_query_ms"] = 1000 * (time.perf_counter() - start) / len(queries)
    out["top1_is_source"] = float((ids[:, 0].numpy() == sources).mean())
    np.save(data / "ids_ivfpq.npy", ids.numpy())
    out["search_peak_rss_delta_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    if (data / "ids_exact.npy").exists():
        exact = np.load(data / "ids_exact.npy")
        sweep = []
        settings = [{"nprobe": v} for v in (16, 32, 64, 128, 256, 512) if v <= plan.params["nlist"]]
        settings += [{"rerank": v} for v in (k, 50, 200, 400)]
        for setting in settings:
            start = time.perf_counter()
            _, found = search(queries, **setting)
            seconds = time.perf_counter() - start
            recall = float((found.numpy()[:, :, None] == exact[:, None, :]).any(2).mean())
            sweep.append({**setting, "recall@10": recall, "batch_query_ms": 1000 * seconds / len(queries)})
        out["sweep"] = sweep
    add_count = args.add_count if args.add_count is not None else max(1, n // 10)
    if add_count:
        # further vectors of the same distribution (another seed), generated block by block outside the timing
        extra = data / "extra.npy"
        more = planted_groups_to_file(extra, add_count, dim, args.group, args.noise, args.topic_noise,
                                      args.seed + 7, block_rows, "vectors to add")
        seconds = 0.0
        for first in range(0, add_count, block_rows):
            block = read_block(more, first, min(first + block_rows, add_count))
            start = time.perf_counter()
            ann.add_vectors(index, block)
            seconds += time.perf_counter() - start
            if first == 0 and block_rows < add_count:
                _say(f"  adding {add_count:,} more vectors: about {seconds * add_count / len(block):.0f} s")
        del more
        extra.unlink()
        out["add_s"], out["add_count"] = seconds, add_count
        out["add_peak_rss_delta_mib"] = (_status_kib("VmHWM") - baseline) / 1024
    return out


def _sweep(index, plan, queries, k: int, exact: np.ndarray) -> list[dict]:
    """Recall@k and batch latency at other search-time settings (IVF nprobe, HNSW efSearch)."""
    from plmetric.manifold import ann
    if plan.kind == "ivf":
        nlist = plan.params["nlist"]
        values = sorted({min(nlist, 2**i) for i in range(nlist.bit_length() + 1)} | {plan.params["nprobe"]})
        name = "nprobe"
    else:
        values, name = [16, 32, 64, 128, 256], "ef_search"
    rows = []
    for value in values:
        start = time.perf_counter()
        _, ids = ann.search_index(index, queries, k, plan, **{name: value})
        seconds = time.perf_counter() - start
        recall = float((ids.numpy()[:, :, None] == exact[:, None, :]).any(2).mean())
        rows.append({name: value, "recall@10": recall, "batch_query_ms": 1000 * seconds / len(queries)})
    return rows


def _bank(kind: str, x, k: int, sample: int, baseline: int) -> dict:
    """The k nearest other rows of every row: MemoryBank.neighbours (torch) or faiss."""
    import torch

    from plmetric.manifold import ann
    from plmetric.training.sampling import MemoryBank

    n = len(x)
    start = time.perf_counter()
    if kind == "bank-torch":
        bank = MemoryBank(n, x.shape[1])
        bank.update(torch.arange(n), x)
        table = bank.neighbours(k)
    else:
        # the trainer's own code path for large banks (MemoryBank.neighbours above BANK_APPROXIMATE_ABOVE)
        table = ann.knn_table(torch.as_tensor(x), k, ann.plan_index(n, kind=kind.split("-")[1]))
    out = {"table_s": time.perf_counter() - start, "peak_rss_delta_mib": (_status_kib("VmHWM") - baseline) / 1024}
    rows = torch.from_numpy(np.random.default_rng(0).choice(n, size=min(sample, n), replace=False))
    scores = x[rows] @ x.T
    scores[torch.arange(len(rows)), rows] = -torch.inf
    exact = scores.topk(k, dim=1).indices
    hits = (table[rows][:, :, None] == exact[:, None, :]).any(2).float().mean()
    out["table_recall"] = float(hits)
    return out


def _neighbours(kind: str, x, k: int, sample: int, exact_rows: int, baseline: int) -> dict:
    """``nearest_others`` of every row through HNSW (``neighbours-hnsw``), or exactly on the first
    ``exact_rows`` rows (``neighbours-exact``), timed, with the peak memory above the loaded data."""
    import torch

    from plmetric.manifold import ann
    from plmetric.retrieval.neighbours import BLOCK_ELEMENTS, block_rows, nearest_others

    n = len(x)
    if kind == "neighbours-exact":
        rows = torch.arange(min(exact_rows, n))
        start = time.perf_counter()
        nearest_others(x, k, rows=rows)
        seconds = time.perf_counter() - start
        return {
            "exact_rows": len(rows),
            "exact_rows_s": seconds,
            "exact_all_s_extrapolated": seconds * n / len(rows),
            "block_rows": block_rows(n),
            "block_elements": BLOCK_ELEMENTS,
            "peak_rss_delta_mib": (_status_kib("VmHWM") - baseline) / 1024,
        }
    plan = ann.plan_index(n, kind="hnsw")
    start = time.perf_counter()
    index = ann.build_index(x, plan)
    build_s = time.perf_counter() - start
    build_peak = (_status_kib("VmHWM") - baseline) / 1024
    start = time.perf_counter()
    scores, ids = nearest_others(x, k, faiss_index=(index, plan))
    table_s = time.perf_counter() - start
    out = {
        "params": plan.params,
        "faiss_threads": ann.import_faiss().omp_get_max_threads(),
        "build_s": build_s,
        "build_peak_rss_delta_mib": build_peak,
        "table_s": table_s,
        "rows_per_s": n / table_s,
        "peak_rss_delta_mib": (_status_kib("VmHWM") - baseline) / 1024,
        "table_mib": (scores.numel() * scores.element_size() + ids.numel() * ids.element_size()) / 2**20,
        "self_in_table": int((ids == torch.arange(n)[:, None]).sum()),
    }
    rows = torch.from_numpy(np.sort(np.random.default_rng(0).choice(n, size=min(sample, n), replace=False)))
    start = time.perf_counter()
    exact_scores, exact_ids = nearest_others(x, k, rows=rows)
    out["sample_rows"] = len(rows)
    out["sample_exact_s"] = time.perf_counter() - start
    out["recall@k"] = float((ids[rows][:, :, None] == exact_ids[:, None, :]).any(2).float().mean())
    # the k-th score found against the exact k-th: how far below the true k-th neighbour a miss lies
    out["kth_score_gap_mean"] = float((exact_scores[:, -1] - scores[rows][:, -1]).mean())
    return out


# ----------------------------------------------------------------------------- parent


def _child(kind: str, data: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--k", str(args.k)]
    command += ["--single-queries", str(args.single_queries), "--bank-k", str(args.bank_k)]
    command += ["--bank-sample", str(args.bank_sample), "--block-rows", str(args.block_rows)]
    command += ["--group", str(args.group), "--noise", str(args.noise), "--topic-noise", str(args.topic_noise)]
    command += ["--seed", str(args.seed)]
    if args.add_count is not None:
        command += ["--add-count", str(args.add_count)]
    if kind.startswith("neighbours"):
        command += ["--neighbours-sample", str(args.neighbours_sample)]
        command += ["--neighbours-exact-rows", str(args.neighbours_exact_rows)]
    # the child's progress lines (stderr) are shown as they come; its last one is the error if it fails
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = ["failed"]
    for line in child.stderr:
        if line.strip():
            print(line.rstrip(), flush=True)
            last = [line.strip()]
    stdout = child.stdout.read()
    if child.wait():
        return {"kind": kind, "error": last[-1]}
    return json.loads(stdout.strip().splitlines()[-1])


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    results = []
    blockwise = n >= args.blockwise_from
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        if blockwise:  # never whole in memory: float16 on disk, written block by block
            x = planted_groups_to_file(
                data / "database.npy", n, args.dim, args.group, args.noise, args.topic_noise, args.seed,
                args.block_rows,
            )
            rng = np.random.default_rng(args.seed + 1)
            sources = np.sort(rng.choice(n, size=args.batch, replace=False))
            q = np.asarray(x[sources], dtype=np.float32)
            q += rng.standard_normal(q.shape, dtype=np.float32) * np.float32(args.query_noise / np.sqrt(args.dim))
            queries = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        else:
            x = planted_groups(n, args.dim, args.group, args.noise, args.topic_noise, args.seed)
            queries, sources = noisy_copies(x, args.batch, args.query_noise, args.seed)
            np.save(data / "database.npy", x)
        np.save(data / "queries.npy", queries)
        np.save(data / "sources.npy", sources)
        del x
        parts = [p for p in args.only or ["indexes", "bank"] if p != "bank" or not args.skip_bank]
        if blockwise and (set(parts) - {"indexes"} or set(args.kinds) - set(BLOCKWISE_KINDS)):
            print(f"n={n:,}: from --blockwise-from {args.blockwise_from:,} only the kinds {', '.join(BLOCKWISE_KINDS)} "
                  "run (the others need every vector in memory)", flush=True)
            parts = [p for p in parts if p == "indexes"]
        for kind in NEIGHBOUR_KINDS if "neighbours" in parts else []:
            print(f"n={n:,} {kind} ...", flush=True)
            r = _child(kind, data, args)
            r["load_after"] = os.getloadavg()[0]
            results.append(r)
        for kind in args.kinds if "indexes" in parts else []:
            if blockwise and kind not in BLOCKWISE_KINDS:
                continue
            print(f"n={n:,} {kind} ...", flush=True)
            r = _child(kind, data, args)
            if "error" not in r:
                ids = np.load(data / f"ids_{kind}.npy")
                exact = np.load(data / "ids_exact.npy") if (data / "ids_exact.npy").exists() else None
                if exact is not None:
                    r["recall@10"] = float((ids[:, :, None] == exact[:, None, :]).any(2).mean())
            r["load_after"] = os.getloadavg()[0]
            results.append(r)
        bank_kinds = [b for b in BANK_KINDS if b != "bank-torch" or n <= args.bank_exact_max]
        bank_kinds = [b for b in bank_kinds if b != "bank-flat" or n <= args.bank_exact_max]
        for kind in bank_kinds if "bank" in parts and not args.skip_bank else []:
            print(f"n={n:,} {kind} ...", flush=True)
            r = _child(kind, data, args)
            r["load_after"] = os.getloadavg()[0]
            results.append(r)
    return results


def print_tables(results: list[dict]) -> None:
    if any(not r["kind"].startswith(("bank", "neighbours")) for r in results):
        print_index_table(results)
    banks = [r for r in results if r["kind"].startswith("bank")]
    if banks:
        print()
        print("| n | neighbour table | seconds | peak MiB | recall (sample) |")
        print("|---:|---|---:|---:|---:|")
        for r in banks:
            if "error" in r:
                print(f"| {r.get('n', '?')} | {r['kind']} | error: {r['error']} |")
                continue
            print(
                f"| {r['n']:,} | {r['kind']} | {r['table_s']:.2f} | {r['peak_rss_delta_mib']:.0f} "
                f"| {r['table_recall']:.4f} |"
            )
    neighbours = [r for r in results if r["kind"].startswith("neighbours")]
    if neighbours:
        print()
        print("| n | nearest_others | build s | neighbour pass s | rows/s | peak MiB | recall@k (sample) |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in neighbours:
            if "error" in r:
                print(f"| {r.get('n', '?')} | {r['kind']} | error: {r['error']} |")
            elif r["kind"] == "neighbours-exact":
                print(
                    f"| {r['n']:,} | exact ({r['exact_rows']:,} rows: {r['exact_rows_s']:.1f} s) | - "
                    f"| {r['exact_all_s_extrapolated']:.0f} (extrapolated) "
                    f"| {r['exact_rows'] / r['exact_rows_s']:.0f} | {r['peak_rss_delta_mib']:.0f} | 1 |"
                )
            else:
                params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
                print(
                    f"| {r['n']:,} | hnsw ({params}) | {r['build_s']:.1f} | {r['table_s']:.1f} | {r['rows_per_s']:.0f} "
                    f"| {r['peak_rss_delta_mib']:.0f} | {r['recall@k']:.4f} ({r['sample_rows']} rows) |"
                )


def print_index_table(results: list[dict]) -> None:
    """The table of the search indexes (build, memory, disk, latency, recall)."""
    print(
        "| n | index | build s | peak MiB | disk MiB | 1 query ms | batch ms/query | recall@10 | top-1 = source "
        "| speed-up (batch) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    exact = {r["n"]: r for r in results if r.get("kind") == "exact" and "error" not in r}
    for r in results:
        if r["kind"].startswith(("bank", "neighbours")):
            continue
        if "error" in r:
            print(f"| {r.get('n', '?')} | {r['kind']} | error: {r['error']} |")
            continue
        ref = exact.get(r["n"])
        speed = f"{ref['batch_query_ms'] / r['batch_query_ms']:.1f}x" if ref else "-"
        recall = f"{r['recall@10']:.4f}" if "recall@10" in r else "-"
        params = ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items() if k not in ("trained_on", "factory"))
        name = f"{r['kind']} ({params})" if params else r["kind"]
        print(
            f"| {r['n']:,} | {name} | {r['build_s']:.2f} | {r['peak_rss_delta_mib']:.0f} | {r['disk_mib']:.0f} "
            f"| {r['one_query_ms']:.2f} | {r['batch_query_ms']:.3f} | {recall} | {r['top1_is_source']:.4f} | {speed} |"
        )
    grown = [r for r in results if "add_s" in r]
    if grown:
        print()
        print("| n | index | train rows | train s | add all s | index MiB | float16 vectors MiB | added | add s |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in grown:
            print(
                f"| {r['n']:,} | {r['params']['factory']} | {r['train_rows']:,} | {r['train_s']:.1f} "
                f"| {r['add_all_s']:.1f} | {r['disk_mib']:.0f} | {r['rerank_disk_mib']:.0f} | {r['add_count']:,} "
                f"| {r['add_s']:.1f} |"
            )
    sweeps = [r for r in results if r.get("sweep")]
    if sweeps:
        print()
        print("| n | index | search setting | recall@10 | batch ms/query |")
        print("|---:|---|---:|---:|---:|")
        for r in sweeps:
            for row in r["sweep"]:
                name = next(key for key in ("nprobe", "ef_search", "rerank") if key in row)
                print(
                    f"| {r['n']:,} | {r['kind']} | {name} {row[name]} | {row['recall@10']:.4f} "
                    f"| {row['batch_query_ms']:.3f} |"
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="database sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--group", type=int, default=10, help="near-duplicates per group")
    parser.add_argument("--noise", type=float, default=1.0, help="noise norm of a group member around its centre")
    parser.add_argument("--topic-noise", type=float, default=1.0, help="noise norm of a group centre around its topic")
    parser.add_argument("--query-noise", type=float, default=0.5, help="noise norm of a query around its source")
    parser.add_argument("--batch", type=int, default=1000, help="queries in the batch (and for recall)")
    parser.add_argument("--single-queries", type=int, default=20, help="one-query searches timed (median)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="exact must come first")
    parser.add_argument("--bank-k", type=int, default=4, help="neighbours of the trainer's table (k - 1 = 4)")
    parser.add_argument("--bank-exact-max", type=int, default=50_000, help="largest bank timed exactly (n² work)")
    parser.add_argument("--bank-sample", type=int, default=1000, help="rows whose table recall is checked")
    parser.add_argument("--skip-bank", action="store_true", help="skip the neighbour tables")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        default=None,
        help="parts to run (default: indexes bank; neighbours, issue 22's `plmetric neighbours`, only when named)",
    )
    parser.add_argument("--neighbours-sample", type=int, default=1000, help="rows whose HNSW neighbours are checked")
    parser.add_argument(
        "--neighbours-exact-rows", type=int, default=5000, help="rows of the timed exact path (extrapolated to N)"
    )
    parser.add_argument("--note", default="", help="a remark stored with the machine (e.g. 'shared machine')")
    parser.add_argument(
        "--blockwise-from",
        type=int,
        default=2_000_000,
        help="from this many vectors the data is written to disk as float16 block by block and never loaded whole "
        "(only exact, blockwise, and ivfpq run)",
    )
    parser.add_argument("--block-rows", type=int, default=100_000, help="rows per block (generation, exact, ivfpq add)")
    parser.add_argument(
        "--add-count", type=int, default=None, help="vectors added to the built ivfpq index, timed (default: n / 10)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sample = args.neighbours_sample if args.worker.startswith("neighbours") else args.bank_sample
        exact_rows = args.neighbours_exact_rows
        r = run_kind(args.worker, args.data, args.k, args.single_queries, args.bank_k, sample, exact_rows, args)
        print(json.dumps(r))
        return 0
    import faiss

    load_start = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} CPUs, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    for n in args.sizes:
        results += run_size(n, args)
    print()
    print_tables(results)
    if args.json:
        report = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker", "data")},
            "command": "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "faiss": faiss.__version__,
                "faiss_threads": faiss.omp_get_max_threads(),
                "load_average_start": load_start,
                "note": args.note,
            },
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
