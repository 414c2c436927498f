"""Learner step vs a bare PyTorch loop: tokens/s of Relay's DeepSpeed `Learner.train_step` against
forward / backward / clip / AdamW written directly, on the same model, batch and process.

Both live in one Ray actor (same threads, same memory), take turns, and train
the same rollout batch: whole groups with alternating rewards so the
advantages are non-zero. Relay's step includes everything it does per batch
(Arrow to tensors, entropy, the objective, DeepSpeed's step); the bare loop gets
ready-made tensors and the plain REINFORCE loss with group-mean baseline.

    .venv/bin/python -m benchmarks.learner [--quick]
"""
from __future__ import annotations

import os
import statistics
import time

import pyarrow as pa
import ray
import torch

from benchmarks.common import build_bench_model, module_main, result, spread
from benchmarks.weight_sync import free_port
from buffer.testing import fake_group_fast
from learner.batch import to_tensors
from learner.config import LearnerConfig
from learner.objectives import ObjectiveConfig
from learner.learner import Learner

GROUP_SIZE, PROMPT_LEN = 8, 5


class LearnerVsTorch:
    def __init__(self, cfg: LearnerConfig, model_path: str, port: int):
        from transformers import AutoModelForCausalLM

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        self.cfg = cfg
        self.learner = Learner(cfg, model_path, GROUP_SIZE, temperature=1.0)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.config.use_cache = False
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def relay_step(self, batch: pa.RecordBatch) -> tuple[float, float]:
        t0 = time.perf_counter()
        m = self.learner.train_step(batch)
        return m["tokens"], time.perf_counter() - t0

    def torch_step(self, batch: pa.RecordBatch) -> tuple[float, float]:
        tb = to_tensors(batch, self.learner.pad_id)  # the bare loop starts from tensors: not timed
        adv = tb.rewards - tb.rewards.view(-1, GROUP_SIZE).mean(1).repeat_interleave(GROUP_SIZE)  # (B,)
        t0 = time.perf_counter()
        out = self.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask)
        logp = torch.log_softmax(out.logits.float(), -1)  # (B, L, V)
        pred = logp[:, :-1].gather(-1, tb.input_ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        logp_resp = pred.gather(1, tb.resp_index)  # (B, T)
        loss = -(logp_resp * adv[:, None] * tb.resp_mask).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(tb.resp_mask.sum()), time.perf_counter() - t0


def make_batch(groups: int, response_len: int, vocab: int) -> pa.RecordBatch:
    """Whole groups, token ids folded into the vocabulary; rewards alternate 0/1 within each group."""
    batch = pa.concat_batches([fake_group_fast(f"g{i}", GROUP_SIZE, response_len, PROMPT_LEN) for i in range(groups)])
    tokens = batch.column("token_ids")
    folded = pa.ListArray.from_arrays(tokens.offsets, pa.array(tokens.values.to_numpy() % vocab))
    return batch.set_column(batch.schema.get_field_index("token_ids"), "token_ids", folded.cast(tokens.type))


def run(quick: bool) -> dict:
    hidden, layers, groups, response_len, repeats = (128, 2, 4, 16, 3) if quick else (768, 11, 2, 32, 4)
    model_path, params = build_bench_model(hidden, layers)
    # One micro-batch per step, so the bare loop's single forward/backward is the same work.
    cfg = LearnerConfig(groups_per_step=groups, micro_batch_groups=groups,
                        objective=ObjectiveConfig(max_len=response_len))
    bench = ray.remote(LearnerVsTorch).options(
        num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    ).remote(cfg, model_path, free_port())
    from transformers import AutoConfig

    batch = make_batch(groups, response_len, AutoConfig.from_pretrained(model_path).vocab_size)
    try:
        ray.get([bench.relay_step.remote(batch), bench.torch_step.remote(batch)])  # first steps allocate optimizer state
        samples = []
        for k in range(repeats):
            s = {}
            for which in (("relay", "torch") if k % 2 == 0 else ("torch", "relay")):
                tokens, secs = ray.get(getattr(bench, f"{which}_step").remote(batch))
                s[which] = round(tokens / secs, 1)
                s[f"{which}_s"] = round(secs, 4)
            samples.append(s)
    finally:
        ray.kill(bench)
    value = statistics.median(s["relay"] for s in samples)
    baseline = statistics.median(s["torch"] for s in samples)
    return result("learner_vs_bare_torch", value, baseline, "tokens/s", 0.85, samples,
                  spread=spread([s["relay"] / s["torch"] for s in samples]),
                  config={"params": params, "rows": groups * GROUP_SIZE, "response_len": response_len,
                          "prompt_len": PROMPT_LEN, "zero_stage": cfg.zero_stage, "threads": 1})


if __name__ == "__main__":
    module_main(run, __doc__)
