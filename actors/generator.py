"""The generator: samples groups from one vLLM engine, records behaviour log-probs and scores them.

A plain class; `actors/actor.py` wraps it as a Ray actor. The generator owns what a rollout is --
how a prompt becomes token ids (`encode_all`, through actors/prompts.py's one rendering, for training,
evaluation and in-flight generation alike), sampling params, grouping, rewards, skip rules, versions, and the checks that
keep a half-applied weight version from serving -- and holds an engine that only samples and swaps
weights (actors/engines.py): `SyncEngine` between batches, or `AsyncEngine` (actors/inflight.py)
when `weight_update_mode: in_flight` lets weights change during a generation. vLLM runs with
`logprobs_mode="processed_logprobs"`, so the recorded log-prob of each sampled token is under the
distribution actually sampled from: the behaviour policy mu that off-policy corrections divide by.

Transports deliver weights through `load_weights`, `load_adapter` (a LoRA adapter on the base model),
`weight_layout` and `attach_slot` (pull, `transport.base.WeightReceiver`), or `init_weight_transfer_engine`
and `apply_weight_update` (push, vLLM's weight-transfer engine API; synchronous engine only).
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa

from actors.adapters import AdapterSlot, read_dir
from actors.config import ActorConfig
from actors.engines import Engine, Output, SyncEngine
from actors.judge import JudgeWork
from actors.prompts import Prompt, PromptFormat, render_all
from actors.rewards import Rewards
from buffer.schema import FIELDS as ROLLOUT_FIELDS, rollout_batch
from common.wire import Packed

__all__ = ["GenerationResult", "Generator", "Prompt"]
SAMPLES_PER_REQUEST = 2  # decoded rows a request hands back for the run's samples.jsonl
UNSTORED = PromptFormat(apply_chat_template=False)  # prompts the launcher did not render: text stays text

@dataclass
class GenerationResult(Packed):  # a rollout actor returns it as bytes (common/wire.py); `GenerationResult.of` reads it
    batch: pa.RecordBatch | None  # whole groups, ROLLOUT_SCHEMA
    groups: int
    tokens: int
    version: int
    gen_s: float
    load_s: float  # time spent applying new weights before sampling (0 if none)
    skipped: dict[str, int]  # reason -> groups
    reward_faults: dict[str, int] = field(default_factory=dict)  # samples scored 0 because the reward failed, by reason
    samples: list[dict] = field(default_factory=list)  # a few decoded rows (prompt as the model saw it, response, ...)
    judge_work: list[JudgeWork] = field(default_factory=list)  # groups left to the judge service (reward 0 so far)
    score_s: float = 0.0  # of gen_s, the time spent scoring here (rules, and judges when they are not deferred)
    skipped_by_source: dict[str, int] = field(default_factory=dict)  # data_source -> groups skipped


class Generator:
    defer_judges = False  # model:<name> rows go unscored to the judge service (the rollout actor sets it)
    _updating = False  # a weight load or push failed part-way: the weights may mix two versions
    _shared = False  # the parameters are views of a shared-memory slot (transport/shared_slots.py)

    def __init__(self, cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int, version: int = 0,
                 weight_transfer_backend: str | None = None, engine_kwargs: dict | None = None,
                 adapter_rank: int | None = None):
        """`adapter_rank`: serve LoRA adapters of up to this rank on the base model (learner.lora.sync adapter)."""
        self.cfg, self.id, self.version, self.max_model_len = cfg, generator_id, version, max_model_len
        self.rewards = Rewards(cfg.reward)  # a bad reward file fails before an engine starts
        self._layout: dict | None = None
        self._weights_lock = threading.Lock()  # in_flight: loads run on another thread than generate
        self.adapters = None if adapter_rank is None else AdapterSlot(model_path, adapter_rank, generator_id)
        if self.adapters is not None:  # vLLM's LoRA layers, sized for one adapter at a time
            engine_kwargs = {**(engine_kwargs or {}), **self.adapters.engine_args()}
        self.engine: Engine = _make_engine(cfg, model_path, generator_id, max_model_len, version,
                                           weight_transfer_backend, engine_kwargs)

    def encode(self, prompt: Prompt) -> list[int]:
        """The token ids the engine sees for `prompt`, in training, evaluation and in-flight generation alike."""
        return self.encode_all([prompt])[0]

    def encode_all(self, prompts: list[Prompt]) -> list[list[int]]:
        """`encode` of many prompts: the rendering the launcher stored with each (actors/prompts.py), or, for a
        prompt made without one (benchmarks, tests), the same function's rendering now: a chat through the
        template, a text as it is."""
        return render_all(self.engine.tokenizer, prompts, UNSTORED)

    def close(self) -> None:
        self.engine.close()
        if self.adapters is not None:
            self.adapters.close()

    # ---- weights: the receiver side of transport/ -------------------------------------------------
    def load_weights(self, version: int, named_tensors) -> None:
        """Apply a whole version, or nothing. The tensors are all fetched before vLLM is touched, so a transfer
        that fails mid-way leaves the engine serving the old version, whole; a load that fails once it has
        begun leaves the generator refusing to serve until a whole version lands. In-flight, this may run
        while `generate` runs on another thread: tokens sampled after it returns are from `version`."""
        tensors = list(named_tensors)  # may raise (timeout, dead peer): nothing has been applied yet
        if not tensors:
            raise ValueError(f"generator {self.id}: weights version {version} holds no tensors")
        with self._weights_lock:
            self._refuse_if_shared(version)
            with self._whole_or_refusing(version):
                self.engine.load(version, tensors)

    def load_adapter(self, version: int, named_tensors, config: dict) -> None:
        """Serve a LoRA adapter (PEFT's names and config) on the base model as `version`, whole or not at all. The
        tensors are all fetched and checked against the base model (actors/adapters.py) before vLLM sees them, so
        a damaged version raises and leaves the old one served; a load vLLM refuses once begun leaves the generator
        refusing to serve until a whole version lands, as with full weights."""
        if self.adapters is None:
            raise RuntimeError(f"generator {self.id}: adapter version {version} arrived, but the engine was started "
                               "without LoRA support (adapter_rank)")
        tensors = dict(named_tensors)  # may raise (timeout, dead peer): nothing has been applied yet
        with self._weights_lock:
            self._refuse_if_shared(version)
            directory = self.adapters.prepare(version, tensors, config)  # AdapterError unless whole
            with self._whole_or_refusing(version):
                self.engine.load_adapter(version, directory)
            self.adapters.served(directory)

    def load_adapter_dir(self, version: int, directory: str) -> None:
        """`load_adapter` from a PEFT adapter directory (a resumed run's checkpoint `model/adapter/`)."""
        tensors, config = read_dir(directory)
        self.load_adapter(version, iter(tensors.items()), config)

    @contextmanager
    def _whole_or_refusing(self, version: int):
        """Serve `version` once the body applied it whole. A body that raised may have left a mix of two
        versions: refuse to serve until a whole one lands. Only a failure sets the flag, so an in-flight load
        on another thread does not turn away a `generate` starting meanwhile (the engine pauses it instead)."""
        try:
            yield
        except BaseException:
            self._updating = True
            raise
        self._updating = False
        self.version = version

    def _refuse_if_shared(self, version: int) -> None:
        """A copy into place would write into a slot the learner and other generators share."""
        if self._shared:
            raise RuntimeError(f"generator {self.id} serves its weights from a shared-memory slot; load version "
                               f"{version} through the same transport")

    def weight_layout(self) -> dict:
        """How this engine holds its parameters, for weights written straight into its layout (shared-memory
        slots); computed once, while the engine still holds the checkpoint it loaded, and checked against it."""
        if self._layout is None:
            self._layout = self.engine.layout()
        return self._layout

    def attach_slot(self, version: int, slot, layout: dict) -> None:
        """Serve a whole version from a shared-memory slot (transport/shared_slots.py) without copying: the
        parameters become views of it. Checked whole before anything changes, so a bad version leaves the old
        one served."""
        with self._weights_lock:
            self.engine.attach_slot(version, slot, layout)
            self._shared = True
            self.version = version

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._push_engine().push_init(init_info)

    def apply_weight_update(self, update_info: dict | list[dict], weight_version: str) -> None:
        """start, update and finish as one call, so a single-threaded actor runs no request in between."""
        engine = self._push_engine()
        with self._whole_or_refusing(int(weight_version)):
            engine.push_update(update_info)

    def _push_engine(self) -> SyncEngine:
        if not isinstance(self.engine, SyncEngine):
            raise RuntimeError(f"generator {self.id}: push transports reach the synchronous engine only "
                               "(actors.weight_update_mode between_batches)")
        return self.engine

    def _check_whole(self) -> None:
        if self._updating:
            raise RuntimeError(f"generator {self.id}: a weight update after version {self.version} started and "
                               "did not finish; its weights may mix two versions, so it does not serve")

    # ---- sampling ---------------------------------------------------------------------------------
    def sampling_params(self, greedy: bool = False):
        from vllm import SamplingParams

        return SamplingParams(
            n=1 if greedy else self.cfg.n,
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k if self.cfg.top_k > 0 else -1,
            max_tokens=self.cfg.max_tokens,
            logprobs=0,  # the sampled token's own entry only
            stop=self.cfg.stop or None,
            stop_token_ids=self.cfg.stop_token_ids or None,
            # token_ids always end with the token that completed a stop string (vLLM trims only tokens after it, with
            # their log-probs); keeping the string in the text too makes the text the reward reads what those tokens
            # spell. A stop token id (like EOS) stays in token_ids and decodes to nothing when it is special.
            include_stop_str_in_output=True,
            # vLLM's detokenizer decodes every sampled token as it comes, and again for its log-prob entry: ~14% of
            # a tiny model's generation on CPU. The engine decodes each finished response in one batch instead
            # (actors/engines.py: response_texts), the same text; stop strings need vLLM's own, token by token.
            detokenize=bool(self.cfg.stop),
        )

    def generate(self, prompts: list[Prompt]) -> GenerationResult:
        self._check_whole()
        t0, loading0 = time.time(), self.engine.loading_s()
        skipped: Counter[str] = Counter()
        by_source: Counter[str] = Counter()  # the same skips, by the prompt's data_source
        kept, token_prompts = [], []
        for p, ids in zip(prompts, self.encode_all(prompts)):
            if len(ids) + self.cfg.max_tokens > self.max_model_len or not ids:
                skipped["prompt_too_long" if ids else "prompt_empty"] += 1
                by_source[p.data_source] += 1
                continue
            kept.append(p)
            token_prompts.append(ids)
        outputs = self.engine.sample(token_prompts, self.sampling_params()) if kept else []
        usable = []
        for p, out in zip(kept, outputs):
            if reason := _unusable(out):
                skipped[reason] += 1
                by_source[p.data_source] += 1
            else:
                usable.append((p, out))
        # every sample of the request in one scoring pass: a batched reward sees them all at once
        t_score = time.time()
        scores = iter(self.rewards.score([p for p, out in usable for _ in out.outputs],
                                         [c.text for _, out in usable for c in out.outputs], self.defer_judges))
        score_s = time.time() - t_score
        scored = [[next(scores) for _ in out.outputs] for _, out in usable]
        columns = self._columns(usable, scored, t0)
        work = self._judge_work(usable, scored)
        batch = rollout_batch(columns) if usable else None
        tokens = sum(map(len, columns["behaviour_logprobs"]))
        faults = Counter(info for info in columns["reward_info"] if info)  # samples scored 0: the reward raised or was NaN
        return GenerationResult(batch, len(usable), tokens, self.version, time.time() - t0,
                                self.engine.loading_s() - loading0, dict(skipped), reward_faults=dict(faults),
                                samples=self._samples(usable, columns, scored), judge_work=work, score_s=score_s,
                                skipped_by_source=dict(by_source))

    def _judge_work(self, usable: list[tuple[Prompt, Output]], scored: list[list]) -> list[JudgeWork]:
        """The groups whose rewards were deferred (None), by judge, with their rows' places in the batch: rows are
        laid out group after group, in the order of `usable`."""
        work: dict[str, JudgeWork] = {}
        start = 0
        for (p, out), group_scores in zip(usable, scored):
            if group_scores[0] is None:  # one prompt, one route: the whole group is deferred or none of it
                name = self.rewards.route(p.data_source).name
                w = work.setdefault(name, JudgeWork(name, [], []))
                w.rows.append(list(range(start, start + len(out.outputs))))
                w.groups.append((p.chat(), [c.text for c in out.outputs]))
            start += len(out.outputs)
        return list(work.values())

    def _columns(self, usable: list[tuple[Prompt, Output]], scored: list[list], t_start: float) -> dict[str, list]:
        """The request's rows as ROLLOUT_SCHEMA columns, group after group (one prompt's n samples), straight from
        the engine's outputs. With per-token versions (in-flight), a row's policy_version is its oldest token's:
        what the buffer's staleness bound measures. The token ids stored are the ones the engine generated from
        (`out.prompt_token_ids`), so the learner scores exactly what was sampled. A deferred score (None) is 0
        until the judge service scores the row."""
        cols: dict[str, list] = {name: [] for name in ROLLOUT_FIELDS}
        for (prompt, out), group_scores in zip(usable, scored):
            group_id, k, t_end = uuid.uuid4().hex, len(out.outputs), time.time()
            prompt_ids = list(out.prompt_token_ids)
            cols["rollout_id"] += [f"{group_id}-{i}" for i in range(k)]  # unique as the group id is
            for name, value in (("prompt_id", prompt.id), ("group_id", group_id), ("group_size", self.cfg.n),
                                ("prompt_len", len(prompt_ids)), ("generator_id", self.id), ("t_start", t_start),
                                ("t_end", t_end), ("data_source", prompt.data_source)):
                cols[name] += [value] * k
            for comp, score in zip(out.outputs, group_scores):
                reward, info = score or (0.0, "")
                cols["token_ids"].append(prompt_ids + comp.token_ids)
                cols["behaviour_logprobs"].append(comp.logprobs)
                cols["token_versions"].append(comp.versions or [])
                cols["policy_version"].append(min(comp.versions) if comp.versions else self.version)
                cols["reward"].append(reward)
                cols["reward_info"].append(info)
                cols["finish_reason"].append(comp.finish_reason or "stop")
                cols["response_text"].append(comp.text)
        return cols

    def _samples(self, usable: list[tuple[Prompt, Output]], columns: dict[str, list], scored: list[list]) -> list[dict]:
        """The first row of the first few groups, decoded for people: the prompt as the model saw it (template
        and special tokens included), the response, its reward (None: the judge service scores it later), the
        reference answer."""
        out, row = [], 0
        for (p, o), group_scores in list(zip(usable, scored))[:SAMPLES_PER_REQUEST]:
            out.append({"prompt": self.engine.tokenizer.decode(list(o.prompt_token_ids), skip_special_tokens=False),
                        "response": columns["response_text"][row], "answer": p.answer,
                        "reward": None if group_scores[0] is None else columns["reward"][row],
                        "source": p.data_source, "policy_version": columns["policy_version"][row], "prompt_id": p.id})
            row += len(o.outputs)
        return out

    def evaluate(self, prompts: list[Prompt]) -> dict[str, float]:
        """Greedy decoding on held-out prompts, encoded as training encodes them: mean reward and response length,
        and the mean reward of each data_source (eval/reward_mean/<source>)."""
        self._check_whole()
        outs = self.engine.sample(self.encode_all(prompts), self.sampling_params(greedy=True))
        scores = [s for s, _ in self.rewards.score(prompts, [o.outputs[0].text for o in outs])]
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        per_source: dict[str, list[float]] = {}
        for p, score in zip(prompts, scores):
            if p.data_source:
                per_source.setdefault(p.data_source, []).append(score)
        return {"eval/reward_mean": sum(scores) / len(scores), "eval/response_length_mean": sum(lengths) / len(lengths),
                **{f"eval/reward_mean/{k}": sum(v) / len(v) for k, v in per_source.items()}}


def _unusable(out: Output) -> str:
    """Why a group cannot be trained on ("" if it can): group-relative objectives need every member, so a group
    with an unusable sample is dropped whole, with a reason."""
    for comp in out.outputs:
        if not comp.token_ids:
            return "empty_generation"
        if not all(map(math.isfinite, comp.logprobs)):
            return "nonfinite_logprobs"
    return ""


def _make_engine(cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int, version: int,
                 weight_transfer_backend: str | None, engine_kwargs: dict | None) -> Engine:
    """The engine `cfg.weight_update_mode` asks for; a push transport needs vLLM's weight-transfer engine
    configured at build time, which only the synchronous engine wires up."""
    if cfg.weight_update_mode == "between_batches":
        return SyncEngine(cfg, model_path, generator_id, max_model_len, weight_transfer_backend, engine_kwargs)
    if engine_kwargs and engine_kwargs.get("enable_lora"):  # a request's adapter is fixed for its whole life
        raise ValueError(f"generator {generator_id}: LoRA adapter sync needs actors.weight_update_mode between_batches")
    if weight_transfer_backend is not None:
        raise ValueError(f"generator {generator_id}: actors.weight_update_mode in_flight loads the versions its "
                         f"transport fetches (object_store, disk); the push engine {weight_transfer_backend!r} "
                         "is not wired to the pause/resume path")
    from actors.inflight import AsyncEngine

    return AsyncEngine(cfg, model_path, generator_id, max_model_len, version, engine_kwargs)
