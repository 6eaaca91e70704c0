"""`make bench`: every benchmark, one after another (they need the machine to themselves)."""

import importlib

for name in ("methods", "qlora", "train", "plan", "serve", "load", "dist", "joint",
             "gateway_memory", "packing", "grammar", "classify"):
    mod = importlib.import_module(f"bench.{name}")  # a benchmark that cannot import fails here
    print(f"\n=== bench.{name}", flush=True)
    mod.main()
