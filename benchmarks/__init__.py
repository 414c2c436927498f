"""Benchmarks: `python -m benchmarks.run [--quick]` measures every ratio in one run (see benchmarks/run.py).

Each module has `run(quick) -> dict | list[dict]` (result rows, see `common.result`) and prints its JSON
when run as a script; `common` holds the statistics, the models, machine facts and the writers. `gpu_check` is
not a ratio and not in the suite: a pass/fail table of the GPU path for a machine without vLLM or Ray.
"""
