"""End to end against a peer: TRL's `GRPOTrainer` and Relay on the same model, task, group size,
completion length, learning rate and machine; trained samples per second and reward against wall time.

TRL runs in a subprocess (its own torch threads, nothing of Relay's Ray session
in it) and generates with transformers: its vLLM colocate mode fails on CPU
(`'Parameter' object has no attribute 'weight_loader'`). Relay runs its
default launcher (one rollout actor, one learner rank, staleness bound 1) on
the same two cores. Both score with Relay's exact-match arithmetic reward.
Each row keeps both sides' seconds per step (`seconds_per_step`): TRL's generation,
forward + backward and the rest; Relay's learner parts (its own step timers) and
its generator's busy fraction. Two rows: fp32 (the target) and both sides in bf16.
`trl` is in the `bench` extra only; without it the result is null with the reason.

    .venv/bin/python -m benchmarks.trl_e2e [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.async_sync import run_job, step_parts
from benchmarks.common import build_bench_model, ray_start, result, skipped
from launch.config import load_config

GROUP, COMPLETIONS, COMPLETION_LEN, LR = 8, 16, 32, 1e-5  # 2 prompts x 8 completions of <= 32 tokens per step


def trl_worker(model_path: str, steps: int, bf16: bool = False) -> dict:
    """Runs in the subprocess: `steps` GRPO steps; returns per-step (seconds since train start, reward).
    bf16: TRL's own mixed precision (fp32 weights, the forward under bf16 autocast, generation included)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.rewards import arithmetic_reward
    from launch.data import load_prompts

    prompts = load_prompts("synthetic:arithmetic").prompts
    data = Dataset.from_list([{"prompt": p.text, "answer": p.answer} for p in prompts])

    def reward(completions, answer, **_):
        return [arithmetic_reward(c, a) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.points: list[list] = []  # [seconds, step, reward] at each logged step

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.points.append([time.perf_counter() - self.t0, state.global_step, logs["reward"]])

    with tempfile.TemporaryDirectory(prefix="relay-bench-trl-") as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=COMPLETIONS, num_generations=GROUP,
                            max_completion_length=COMPLETION_LEN, max_steps=steps, learning_rate=LR,
                            lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                            use_cpu=True, bf16=bf16, beta=0.0, temperature=1.0, seed=0)
        clock = Clock()
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                              reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=AutoTokenizer.from_pretrained(model_path), callbacks=[clock])
        spent = {"generate": [], "train_step": []}  # seconds per call, in step order
        for name, method in (("generate", "_generate_and_score_completions"), ("train_step", "training_step")):
            setattr(trainer, method, _timed(getattr(trainer, method), spent[name]))
        trainer.train()
    first = clock.points[0][0]  # times from the first step's end, as for Relay
    return {"points": [[round(t - first, 3), step, r] for t, step, r in clock.points], "threads": torch.get_num_threads(),
            "spent": spent}


def _timed(fn, into: list):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        into.append(time.perf_counter() - t0)
        return out
    return timed


def trl_parts(trl: dict) -> dict:
    """TRL's seconds per steady-state step: generation (HF generate and the reward), forward + backward (the rest of
    training_step, which calls the generation), and the rest of the step (optimizer, clipping, logging)."""
    steps = len(trl["points"]) - 1
    step_s = trl["points"][-1][0] / steps
    gen = statistics.mean(trl["spent"]["generate"][1:])
    train = statistics.mean(trl["spent"]["train_step"][1:]) - gen
    return {k: round(v, 3) for k, v in {"step_s": step_s, "generate_s": gen, "forward_backward_s": train,
                                         "other_s": step_s - gen - train}.items()}


def relay_parts(records: list[dict], times: list[float]) -> dict:
    """Relay's seconds per steady-state step: the learner's parts (its own timers), the publish, and the generator's
    busy fraction (generation and the weight load, over the step)."""
    parts = step_parts(records, times)
    steps = records[1:]
    for key in ("prepare", "forward", "backward", "optimizer"):
        parts[f"learner_{key}_s"] = round(statistics.mean(r.get(f"learner_{key}_s") or 0.0 for r in steps), 4)
    parts["generator_busy_fraction"] = round((parts["generate_s"] + parts["weight_load_s"]) / parts["step_s"], 3)
    parts["learner_busy_fraction"] = round((parts["learner_step_s"] + parts["weight_sync_s"]) / parts["step_s"], 3)
    return parts


def run_trl(model_path: str, steps: int, bf16: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.trl_e2e", "--trl-worker", model_path, str(steps)] + (["--bf16"] if bf16 else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_relay(model_path: str, steps: int, overrides: dict | None = None) -> dict:
    cfg = load_config("configs/default.yaml", {
        "model.path": model_path, "actors.n": GROUP, "actors.max_tokens": COMPLETION_LEN,
        "actors.prompts_per_request": COMPLETIONS // GROUP, "learner.groups_per_step": COMPLETIONS // GROUP,
        "learner.micro_batch_groups": COMPLETIONS // GROUP, "learner.total_steps": steps, "learner.lr": LR,
        "learner.track_ref_kl": False, "learner.objective.name": "grpo", "progress": False, "tensorboard": False,
    } | (overrides or {}))
    _, records, times = run_job(cfg, model_path)
    return {"points": [[round(t - times[0], 3), r["step"], r["reward_mean"]] for t, r in zip(times, records)],
            "max_staleness": cfg.buffer.max_staleness, "parts": relay_parts(records, times)}


# Relay's knobs for the bf16 row (the job is the same in both: model, task, group, lengths, lr). That row runs both
# sides in bf16: TRL's bf16=True (fp32 weights, training and generation under bf16 autocast) against Relay's learner
# under bf16 autocast (fp32 weights) and its vLLM engine in bf16; it is reported beside the fp32 headline. The
# learner keeps one thread (learner.num_threads unset): two lost in both precisions (README, e2e_vs_trl_grpo).
BF16_KNOBS = {"learner.autocast_bf16": True, "actors.dtype": "bfloat16"}
PRECISIONS = (("e2e_vs_trl_grpo", False, 2.0), ("e2e_vs_trl_grpo_bf16", True, None))


def compare(name: str, bf16: bool, target: float | None, model_path: str, params: int, steps: tuple[int, int]) -> dict:
    relay_steps, trl_steps = steps
    knobs = BF16_KNOBS if bf16 else {}
    relay = run_relay(model_path, relay_steps, knobs)
    trl = run_trl(model_path, trl_steps, bf16)
    trl["parts"] = trl_parts(trl)
    rates = {}
    for side, r in (("relay", relay), ("trl", trl)):  # steady state: from the first step's end to the last's
        rates[side] = (len(r["points"]) - 1) * COMPLETIONS / r["points"][-1][0]
        r["samples_per_s"] = round(rates[side], 3)
        r["reward_per_sample"] = round(statistics.mean(p[2] for p in r["points"]), 4)  # equal samples per step
    return result(name, rates["relay"], rates["trl"], "samples/s", target, [{"relay": relay, "trl": trl}],
                  reward_per_sample={"relay": relay["reward_per_sample"], "trl": trl["reward_per_sample"]},
                  seconds_per_step={"relay": relay["parts"], "trl": trl["parts"]},
                  config={"params": params, "group_size": GROUP, "completions_per_step": COMPLETIONS,
                          "max_completion_len": COMPLETION_LEN, "lr": LR, "relay_steps": relay_steps,
                          "trl_steps": trl_steps, "relay_objective": "grpo", "trl_loss": "GRPOConfig default, beta 0",
                          "relay_knobs": knobs, "precision": "bf16" if bf16 else "fp32"})


def run(quick: bool) -> list[dict]:
    hidden, layers, trl_steps, relay_steps = (128, 2, 3, 4) if quick else (768, 11, 6, 16)
    if importlib.util.find_spec("trl") is None:
        return [skipped(name, "samples/s", target, "trl is not installed (pip install -e '.[bench]'); not measured")
                for name, _, target in PRECISIONS]
    model_path, params = build_bench_model(hidden, layers)
    return [compare(name, bf16, target, model_path, params, (relay_steps, trl_steps)) for name, bf16, target in PRECISIONS]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl-worker"]:
        print(json.dumps(trl_worker(sys.argv[2], int(sys.argv[3]), "--bf16" in sys.argv[4:])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    ray_start()
    print(json.dumps(run(quick)))
