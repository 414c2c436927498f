"""The run's data, loaded and checked before any actor starts: training and evaluation prompts (launch/data.py;
data.sources' mixture: launch/mixture.py) and offline rollout sources (launch/offline_data.py), rendered with the
run's tokenizer."""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.prompts import Prompt
from launch.config import RunConfig
from launch.data import DataError, PromptSet, load_prompts, prompt_format, render_prompts
from launch.mixture import SourceData, combined, load_source
from launch.offline_data import load_offline


@dataclass
class RunData:
    train: PromptSet
    eval: list[Prompt]
    offline: list = field(default_factory=list)  # launch.offline_data.OfflineSet per data.offline source
    sources: list[SourceData] = field(default_factory=list)  # data.sources, each on its own (train: all of them)


def prepare_prompts(cfg: RunConfig, model_path: str, rewards=None) -> RunData:
    """The run's training and evaluation prompts, loaded, checked and rendered with the model's tokenizer, before
    any actor starts. `rewards` (actors.rewards.Rewards) checks that every row's data_source has a reward."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    D, fmt = cfg.data, prompt_format(cfg.data)
    max_len = cfg.model.max_model_len - cfg.actors.max_tokens
    if D.max_prompt_len is not None:
        max_len = min(max_len, D.max_prompt_len)
    sources = [load_source(cfg, i, s, tokenizer) for i, s in enumerate(D.sources)]
    if sources:
        train, evals = combined(sources), [p for s in sources for p in s.eval]
    else:
        train = render_prompts(load_prompts(D.train, D), tokenizer, fmt, max_len, D.train)
        evals = render_prompts(load_prompts(D.eval, D, D.eval_split), tokenizer, fmt, max_len, D.eval).prompts \
            if D.eval else []
    if rewards is not None and (missing := rewards.unrouted(p.data_source for p in train.prompts + evals)):
        raise DataError(f"config key 'actors.reward': no reward for data_source {missing} (add them to the "
                        "mapping, or a `default` entry)")
    return RunData(train, evals, load_offline(cfg, tokenizer), sources)
