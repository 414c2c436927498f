"""What a user sees of a run: metrics.jsonl, TensorBoard event files, a progress bar, a summary line."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Keys every metrics.jsonl line carries (None where a value does not apply to the run).
REQUIRED = ("step", "policy_version", "reward_mean", "response_length_mean", "entropy_mean", "kl_to_ref",
            "staleness_mean", "staleness_max", "is_weight_ess", "samples_per_s", "tokens_per_s",
            "learner_step_s", "weight_sync_s")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v


class MetricsLog:
    def __init__(self, run_dir: Path, total_steps: int, tensorboard: bool, progress: bool):
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="relay", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        record = {k: _clean(record.get(k)) for k in REQUIRED} | {k: _clean(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and v is not None and k != "step":
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", sps=f"{record['samples_per_s'] or 0:.0f}",
                                 stale=f"{record['staleness_mean']:.2f}", v=record["policy_version"], refresh=False)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
