"""`make bench`: every benchmark, one after another (they need the machine to themselves)."""

import importlib

for name in ("methods", "qlora", "train", "plan", "serve", "load", "dist", "joint"):
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError:
        continue
    print(f"\n=== bench.{name}", flush=True)
    mod.main()
