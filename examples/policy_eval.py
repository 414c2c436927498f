"""Score a saved policy on the arithmetic task: sampled reward and exact KL(pi || ref), for the offline examples.

A purely offline run (`data.offline_fraction: 1.0`) starts no rollout actor, so its reward_mean is the reward of
the recorded rows it trains on, not of the policy it learns, and its kl_to_ref is a k3 estimate on tokens the
reference sampled, not the policy. So the examples save checkpoints and score each one here: every prompt of the
task, `n` samples each at the run's temperature (1.0, no top-p/top-k: what the rollout actors sample), scored with
the run's reward, and the sequence KL(pi || ref) = E_{y~pi} sum_t KL(pi(.|y_<t) || ref(.|y_<t)), each position's
KL computed over the whole vocabulary (an unbiased, low-variance estimate of the sequence-level KL).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.prompts import render_all
from actors.rewards import arithmetic_reward
from launch.config import RunConfig
from launch.data import load_prompts, prompt_format


@dataclass(frozen=True)
class Score:
    reward: float  # mean reward of the samples
    kl: float  # mean sequence KL(pi || ref), nats
    length: float  # mean response tokens, eos included
    off_support: float | None = None  # share of samples whose response the offline data never holds for that prompt


def reference_dir(cfg: RunConfig) -> Path:
    """The run's initial policy: its model.path, or the tiny default model it built (cached, so built once)."""
    if cfg.model.path:
        return Path(cfg.model.path)
    from launch.model import build_default_model

    return Path(build_default_model(cfg.model, cfg.data.max_operand, Path(cfg.output_dir) / "_models",
                                    prompt_format(cfg.data)))


def _load(path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def score(policy_dir: Path, ref_dir: Path, cfg: RunConfig, n: int = 8, seed: int = 0,
          support: dict[str, set[str]] | None = None) -> Score:
    """Reward and KL(pi || ref) of the policy saved in `policy_dir`, from n samples of every task prompt; with
    `support` (prompt id -> the response texts the data holds for it) also the share of samples outside it."""
    tok = AutoTokenizer.from_pretrained(ref_dir)
    policy, ref = _load(policy_dir), _load(ref_dir)
    prompts = load_prompts(cfg.data.train, cfg.data).prompts
    ids = render_all(tok, prompts, prompt_format(cfg.data))
    width = max(map(len, ids))
    # left padding: every prompt ends at the same column, so generation continues from there for all rows
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids]).repeat_interleave(n, 0)  # (B, P)
    attn = (input_ids != tok.pad_token_id).long()  # (B, P)
    torch.manual_seed(seed)
    out = policy.generate(input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=cfg.actors.temperature,
                          top_p=1.0, top_k=0, max_new_tokens=cfg.actors.max_tokens, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)  # (B, P + R)
    response = out[:, width:]  # (B, R)
    # response tokens up to and including the first eos; generate pads what follows it
    is_eos = (response == tok.eos_token_id).long()  # (B, R)
    mask = ((is_eos.cumsum(-1) - is_eos) == 0).float()  # (B, R)
    full_attn = torch.cat([attn, mask.long()], dim=1)  # (B, P + R)
    positions = (full_attn.cumsum(-1) - 1).clamp(min=0)  # (B, P + R)
    logits_pi = policy(input_ids=out, attention_mask=full_attn, position_ids=positions).logits[:, width - 1:-1]  # (B, R, V)
    logits_ref = ref(input_ids=out, attention_mask=full_attn, position_ids=positions).logits[:, width - 1:-1]  # (B, R, V)
    logp_pi, logp_ref = logits_pi.log_softmax(-1), logits_ref.log_softmax(-1)  # (B, R, V)
    kl_tok = (logp_pi.exp() * (logp_pi - logp_ref)).sum(-1)  # (B, R)
    kl = (kl_tok * mask).sum(-1)  # (B,)
    texts = tok.batch_decode(response, skip_special_tokens=True)
    answers = [p.answer for p in prompts for _ in range(n)]
    rewards = [arithmetic_reward(t, a) for t, a in zip(texts, answers)]
    off = None
    if support is not None:
        ids_per_sample = [p.id for p in prompts for _ in range(n)]
        off = sum(t not in support.get(i, ()) for t, i in zip(texts, ids_per_sample)) / len(texts)
    return Score(reward=sum(rewards) / len(rewards), kl=float(kl.mean()), length=float(mask.sum(-1).mean()),
                 off_support=off)


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, model dir) of every checkpoint a run kept, in step order, and its final weights."""
    found = [(int(p.name.split("-")[1]), p / "model") for p in sorted((run_dir / "checkpoints").glob("step-*"))]
    summary_steps = int(RunConfig.model_validate(_config(run_dir)).learner.total_steps)
    if (run_dir / "final").is_dir() and all(s != summary_steps for s, _ in found):
        found.append((summary_steps, run_dir / "final"))
    return found


def _config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def support_of(parquet: Path) -> dict[str, set[str]]:
    """prompt id -> every response text an offline file (e.g. a `launch.export`) holds for it."""
    import pyarrow.parquet as pq

    table = pq.read_table(parquet, columns=["prompt_id", "response_text"])
    out: dict[str, set[str]] = {}
    for pid, text in zip(table.column("prompt_id").to_pylist(), table.column("response_text").to_pylist()):
        out.setdefault(pid, set()).add(text)
    return out


def score_run(run_dir: Path, n: int = 8, support: dict[str, set[str]] | None = None,
              with_reference: bool = True) -> list[tuple[int, Score]]:
    """Every kept checkpoint of the run (and step 0, the reference itself, with `with_reference`), scored."""
    cfg = RunConfig.model_validate(_config(run_dir))
    ref = reference_dir(cfg)
    points = ([(0, ref)] if with_reference else []) + checkpoint_dirs(run_dir)
    return [(step, score(path, ref, cfg, n=n, support=support)) for step, path in points]
