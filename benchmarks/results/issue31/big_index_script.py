"""Build a sharded float16 index of N planted 512-d vectors with an ivfpq faiss file (the product path:
write_index), for timing serve / neighbours / duplicates at scale. Usage: big_index.py N OUTDIR"""
import sys, time, json, os
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for index_scale
from index_scale import planted_groups
from plmetric.core.checkpoint import save_model
from plmetric.data.backbones import create_model
from plmetric.retrieval.index import write_index, load_embedding_model
from plmetric.manifold import ann

n, out = int(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = create_model("efficientnet_lite0", embedding_dim=512, pretrained=False)
ckpt = save_model(out / "model.safetensors", model, {"backbone": "efficientnet_lite0", "embedding_dim": 512, "image_size": 64})
_, description = load_embedding_model(ckpt, "efficientnet_lite0", 512)
t = time.perf_counter()
x = torch.from_numpy(planted_groups(n, 512, 10, 1.0, 1.0, 0))
print(f"generated {n:,} in {time.perf_counter()-t:.0f} s", flush=True)
paths = [f"/srv/pile/{i // 1000:05d}/{i:08d}.jpg" for i in range(n)]
plan = ann.plan_index(n, kind="ivfpq", dim=512)
print("plan", plan, flush=True)
t = time.perf_counter()
write_index(out / "pile.safetensors", x, torch.full((n,), -1), paths, description, plan,
            stats=torch.full((n, 2), -1, dtype=torch.int64), dtype="float16")
build = time.perf_counter() - t
sizes = {p.name: p.stat().st_size / 2**20 for p in out.iterdir()}
print(json.dumps({"n": n, "build_and_write_s": build, "files_mib": sizes}), flush=True)
