"""What a user sees of a run: metrics.jsonl, samples.jsonl, TensorBoard event files, optional W&B (offline), a
progress bar, a summary line."""
from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

# Keys every metrics.jsonl line carries (None where a value does not apply to the run).
REQUIRED = ("step", "policy_version", "reward_mean", "response_length_mean", "entropy_mean", "kl_to_ref",
            "staleness_mean", "staleness_max", "is_weight_ess", "samples_per_s", "tokens_per_s",
            "learner_step_s", "weight_sync_s")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


def _scalars(record: dict, prefix: str) -> dict:
    """Numeric values only (W&B would chart a None as a string column), namespaced like TensorBoard's tags."""
    return {(k if "/" in k else prefix + k): v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _wandb_run(run_dir: Path, config: dict):
    """An offline W&B run: nothing leaves the machine; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later.
    A resumed run starts a second offline run in the same folder (offline runs cannot be resumed)."""
    import wandb

    return wandb.init(mode="offline", dir=str(run_dir), project=config.get("name", "relay"), name=run_dir.name,
                      config=config, settings=wandb.Settings(console="off"))  # Ray's forwarded actor logs: not twice


def _indent(text: str) -> str:
    """A markdown code block line by line (TensorBoard renders text as markdown; templates are not markdown)."""
    return text.replace("\n", "\n    ")


def read_history(run_dir: Path, up_to_step: int) -> list[dict]:
    """Training records of steps <= up_to_step (a resumed run continues the first run's history)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if "reward_mean" in r and r["step"] <= up_to_step]


class MetricsLog:
    """metrics.jsonl (one line per learner step, plus eval lines), events.jsonl (fleet, checkpoints), TensorBoard,
    a progress bar; with `wandb` (the run's config as a dict) also a W&B run in offline mode under run_dir/wandb.
    With start_step > 0 (a resume) lines past the checkpoint are dropped, not duplicated. `samples` = (every k
    steps, n rows): samples.jsonl gets the n most recent decoded rollouts every k learner steps (k = 0: never)."""

    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: bool, start_step: int = 0,
                 wandb: dict | None = None, samples: tuple[int, int] = (0, 1)):
        self.samples_every, self.recent = samples[0], deque(maxlen=samples[1])
        self.samples_file = open(run_dir / "samples.jsonl", "a", buffering=1) if self.samples_every else None
        path = run_dir / "metrics.jsonl"
        if start_step and path.exists():  # the dead process may have logged steps after its last checkpoint
            keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.file = open(path, "a", buffering=1)
        self.events = open(run_dir / "events.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = _wandb_run(run_dir, wandb) if wandb is not None else None
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="relay", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        record = {k: _clean(record.get(k)) for k in REQUIRED} | {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and v is not None and k != "step":
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(_scalars(record, "train/"), step=step)
        if self.samples_every and step % self.samples_every == 0:
            self._write_samples(step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", sps=f"{record['samples_per_s'] or 0:.0f}",
                                 stale=f"{record['staleness_mean']:.2f}", v=record["policy_version"], refresh=False)

    def keep_samples(self, samples: list[dict]) -> None:
        """Decoded rows a generation request handed back (actors/generator.py); the newest are written next."""
        self.recent.extend(samples)

    def _write_samples(self, step: int) -> None:
        """samples.jsonl lines and a TensorBoard text panel: what the model read and wrote, and how it scored.
        The rows are the newest generated (not necessarily the ones this step trained on); policy_version
        says which weights wrote each."""
        rows = [{"step": step, **{k: _clean(v) for k, v in r.items()}} for r in self.recent]
        self.recent.clear()
        for row in rows:
            self.samples_file.write(json.dumps(row) + "\n")
        if self.tb is not None and rows:
            text = "\n\n".join(f"**reward {r['reward']}** (answer `{r['answer']}`, source `{r['source']}`, "
                                f"policy v{r['policy_version']})\n\n    {_indent(r['prompt'])}\n    ---\n    "
                                f"{_indent(r['response'])}" for r in rows)
            self.tb.add_text("samples", text, step)

    def log_eval(self, step: int, metrics: dict) -> None:
        """Held-out evaluation: an `eval/...` line in metrics.jsonl and the same scalars in TensorBoard."""
        self.file.write(json.dumps({"step": step, **{k: _clean(v) for k, v in metrics.items()}}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:  # same step as that step's training line: W&B merges them into one history row
            self.wandb.log(_scalars(metrics, "eval/"), step=step)

    def event(self, record: dict) -> None:
        """Something that happened to the run (an actor died, restarted, was added; a checkpoint was written)."""
        self.events.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.bar is not None and record.get("event") in ("actor_failed", "actor_added", "actor_retiring", "resumed"):
            self.bar.write(f"relay: step {record.get('step')}: {record['event']} {record.get('actor', record.get('path', ''))}")

    def close(self) -> None:
        if self.samples_file is not None:
            self.samples_file.close()
        self.events.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
