"""Learned judges' configuration: the run's `rewards:` section (named reward and preference models).

A reward spec `model:<name>` (in `actors.reward`, as one spec or as a data_source mapping's value) names an entry of
`rewards.models`. Each entry is a Hugging Face sequence-classification model with exactly one output, served by its
own pool of Ray actors (actors/judge_pool.py): `kind: scalar` scores (prompt, response) as a reward model does;
`kind: preference` scores a pair and turns a group's pairs into win rates (actors/judge_format.py).

`judge_problem` is the one check of a judge's files (the launcher's config check and `Judge` itself use it), so a
wrong path, a head with other than one output or a tokenizer without a chat template is refused the same way,
naming the key, before any actor starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_PREFIX = "model:"  # a reward spec naming a judge: model:<name of rewards.models>


class RewardModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["scalar", "preference"] = "scalar"
    """scalar: a reward model, one score per (prompt, response); preference: P(a > b | prompt) = sigmoid of its one
    output on the pair, read in both orders, and each sample's reward is its mean win probability in its group."""
    path: str | None = None
    """Local directory or hub name of a sequence-classification model with exactly one output (num_labels 1) and
    a tokenizer with a chat template. None: the launcher builds the tiny judge of this kind for synthetic:arithmetic
    (launch/judges.py, seconds on CPU, cached beside the tiny policy) before any actor starts."""
    num_actors: int = Field(1, ge=1)
    """Judge actors started for this model; `python -m launch.scale --reward-actors NAME=N` resizes the pool."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each judge actor reserves from Ray."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs each judge actor reserves (0 on CPU machines; fractions share one GPU)."""
    resources: dict[str, float] = {}
    """Ray custom resources each judge actor reserves (e.g. {judge_node: 1})."""
    max_tokens_per_batch: int = Field(4096, ge=1)
    """Token budget of one forward: rows x longest row (right-padded) stay within it; a longer row runs alone."""
    max_length: int | None = Field(None, ge=8)
    """Longest judge input in tokens; longer ones keep their last max_length tokens (the response's end, where the
    score is read), counted as `judge_truncated`. None: the model's max_position_embeddings."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Judge weights and activations: auto is bfloat16 on GPU (num_gpus > 0) and float32 on CPU."""
    timeout_s: float = Field(120.0, gt=0)
    """A judge call (one chunk of a request) that takes longer counts as a stuck actor: it is killed and replaced,
    and its chunk is scored again on another actor."""
    max_failures: int = Field(3, ge=1)
    """A judge slot that fails this many times in a row fails the requests it held (they are generated again)."""
    normalize: bool = False
    """scalar: standardise scores with `mean` and `std` ((s - mean) / std), as OpenRLHF's normalize_reward does."""
    mean: float = 0.0
    """scalar, normalize: the score mean subtracted."""
    std: float = Field(1.0, gt=0)
    """scalar, normalize: the score std divided by."""


class RewardsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, RewardModelConfig] = {}
    """Named judges; a reward spec `model:<name>` scores with one (see actors.reward)."""


def model_name(spec: str) -> str | None:
    """The judge a reward spec names (`model:rm` -> "rm"), or None for a rule or a user function."""
    return spec[len(MODEL_PREFIX):] if spec.startswith(MODEL_PREFIX) else None


def named_models(reward: str | dict[str, str]) -> set[str]:
    """The judges `actors.reward` (one spec or a data_source mapping) names."""
    specs = [reward] if isinstance(reward, str) else list(reward.values())
    return {name for s in specs if (name := model_name(s)) is not None}


def resolved_judge_dtype(cfg: RewardModelConfig) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if cfg.num_gpus > 0 else "float32"


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1


def judge_problem(key: str, path: str, local_only: bool = False) -> str | None:
    """Why the judge at `path` cannot serve (None: it can). `local_only`: a hub name that is not in the local cache
    is not fetched here (the judge actor loads it), only a local path that does not exist is refused."""
    from transformers import AutoConfig, AutoTokenizer

    if looks_local(path) and not Path(path).expanduser().exists():
        return f"config key {key!r}: {path} does not exist"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except Exception as exc:  # no config.json, offline without a cached copy, an unknown architecture
        if local_only and not looks_local(path):
            return None
        return f"config key {key!r}: cannot read the model config of {path} ({type(exc).__name__})"
    if config.num_labels != 1:
        return (f"config key {key!r}: {path} has a classification head with {config.num_labels} outputs; a judge "
                "needs exactly one (a reward model's score, a preference model's logit of P(a > b))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except Exception as exc:
        return f"config key {key!r}: cannot load the tokenizer of {path} ({type(exc).__name__})"
    if not getattr(tokenizer, "chat_template", None):
        return (f"config key {key!r}: the tokenizer of {path} has no chat template; a judge reads the prompt and the "
                "response through its own template")
    if config.pad_token_id is None and tokenizer.pad_token_id is None:
        return f"config key {key!r}: {path} defines no pad token (neither the model config nor the tokenizer)"
    return None


def reward_model_problem(specs: dict[str, str | dict[str, str]], rewards: RewardsConfig, group_size: int,
                         evaluated: dict[str, str | None] | None = None, arithmetic: bool = False) -> str | None:
    """Why the judges named by `specs` ({config key: reward spec or data_source mapping}) cannot run (None: they can).
    `evaluated`: {config key of held-out prompts: the reward spec that scores them}. `arithmetic`: a training source
    is synthetic:arithmetic, the only task a judge without a path (a tiny judge built here) knows.

    A preference model's reward is a win rate inside a group, so it needs groups of at least two samples; relative
    to the group is all any objective here reads (every one subtracts a group baseline, and dpo/ipo take best vs
    worst), so no objective is refused. Greedy evaluation samples one response per prompt, which a pairwise judge
    cannot rank: held-out prompts scored by a preference model are refused."""
    for key, reward in specs.items():
        for name in sorted(named_models(reward)):
            if name not in rewards.models:
                return (f"config key {key!r}: model:{name} names no entry of rewards.models "
                        f"(it has {sorted(rewards.models) or 'none'})")
    for name, m in rewards.models.items():
        key = f"rewards.models.{name}"
        if m.path is None and not arithmetic:  # launch/train.py builds it, and all it knows is sums
            return (f"config key '{key}.path': not set, which builds a tiny judge of a+b= sums, but no training "
                    "source is synthetic:arithmetic; give a local directory or hub name of a sequence-"
                    "classification model with one output")
        if m.path is not None and (problem := judge_problem(f"{key}.path", m.path, local_only=True)):
            return problem
        if m.kind == "preference" and group_size < 2:
            return (f"config key '{key}.kind': a preference model ranks the samples of a group against each other, "
                    f"and actors.n={group_size} gives groups of one; set actors.n >= 2 or use a scalar reward model")
        if m.kind == "preference" and m.normalize:
            return f"config key '{key}.normalize': standardises a scalar reward model's scores; a preference model's are win rates"
    for key, spec in (evaluated or {}).items():
        name = model_name(spec) if spec else None
        if name in rewards.models and rewards.models[name].kind == "preference":
            return (f"config key {key!r}: greedy evaluation samples one response per prompt, which the preference "
                    f"model {name} cannot rank; drop it or score these prompts with a scalar reward")
    return None
