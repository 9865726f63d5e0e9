import sys, time, json
from plmetric.retrieval.serve import Browser
from plmetric.retrieval.index import load_faiss_index
from plmetric.retrieval.stored import open_index
p = sys.argv[1]
out = {}
t = time.perf_counter(); s = open_index(p); out["open_index_s"] = time.perf_counter() - t
t = time.perf_counter(); s.file_stats(); out["file_stats_s"] = time.perf_counter() - t
t = time.perf_counter(); load_faiss_index(p); out["load_faiss_s"] = time.perf_counter() - t
t = time.perf_counter(); b = Browser(p, top_k=10); out["browser_s"] = time.perf_counter() - t
import inspect
print(inspect.signature(b.search_id))
times = []
for i in (5, 500_000, 999_999, 123_456, 777_777):
    t = time.perf_counter(); b.search_id(i, 10); times.append(time.perf_counter() - t)
out["search_id_ms"] = [round(1000 * x, 1) for x in times]
print(json.dumps(out))
