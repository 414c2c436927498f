"""The generator: one vLLM engine that samples groups, records behaviour log-probs and scores them.

A plain class; `actors/actor.py` wraps it as a Ray actor. vLLM runs with
`logprobs_mode="processed_logprobs"`, so the recorded log-prob of each sampled
token is under the distribution actually sampled from (temperature, top-k/p
applied) -- the behaviour policy mu that off-policy corrections divide by.
"""
from __future__ import annotations

import math
import os
import time
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from actors.config import ActorConfig
from actors.rewards import resolve_reward, safe_reward
from buffer.schema import Rollout, rollouts_to_arrow
from transport.plain_weights import layout_of, load_in_place, point_at, set_cpu_weight_layout


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    answer: str


@dataclass
class GenerationResult:
    batch: pa.RecordBatch | None  # whole groups, ROLLOUT_SCHEMA
    groups: int
    tokens: int
    version: int
    gen_s: float
    load_s: float  # time spent applying new weights before sampling (0 if none)
    skipped: dict[str, int]  # reason -> groups
    duplicate: bool = False  # the buffer already held this request (a re-issue raced the original)
    put_s: float = 0.0  # time the rollout actor waited for the buffer to take the batch
    reward_faults: dict[str, int] = field(default_factory=dict)  # samples scored 0 because the reward failed, by reason


class Generator:
    _updating = False  # inside a start/finish weight update, when the weights may mix two versions
    _shared = False  # the parameters are views of a shared-memory slot (transport/shared_slots.py)

    def __init__(self, cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int, version: int = 0,
                 weight_transfer_backend: str | None = None, engine_kwargs: dict | None = None):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg, self.id, self.version, self.model_path = cfg, generator_id, version, model_path
        self._layout: dict | None = None
        self.in_place = cfg.cpu_weight_layout == "plain" and current_platform.is_cpu()
        if current_platform.is_cpu():
            set_cpu_weight_layout("plain" if self.in_place else "packed")  # before the engine loads the model
        if weight_transfer_backend == "relay_cpu":
            import transport.cpu_engine  # noqa: F401  registers the engine with vLLM's factory before the engine is built
        self.max_model_len = max_model_len
        self.reward_fn = resolve_reward(cfg.reward)
        self.llm = LLM(
            model=model_path,
            dtype="float32",
            enforce_eager=True,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=cfg.enable_prefix_caching,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=cfg.seed + zlib.crc32(generator_id.encode()) % 10_000,  # distinct streams per actor
            # vLLM's weight-transfer engine API (init/start/update/finish) is only wired up when configured
            weight_transfer_config=None if weight_transfer_backend is None else {"backend": weight_transfer_backend},
            **(engine_kwargs or {}),
        )
        self.tokenizer = self.llm.get_tokenizer()

    def load_weights(self, version: int, named_tensors) -> None:
        """Apply a whole version in place, or nothing. The tensors are all fetched before vLLM is touched, so
        a transfer that fails mid-way leaves the engine serving the old version, whole. With plain CPU weights
        each tensor is copied into place (a copy failing half-way leaves the generator refusing to serve);
        otherwise vLLM's layerwise reload re-creates and repacks the layers. The prefix cache is reset so no
        block computed under the old weights is reused."""
        tensors = list(named_tensors)  # may raise (timeout, dead peer): nothing has been applied yet
        if not tensors:
            raise ValueError(f"generator {self.id}: weights version {version} holds no tensors")
        self._refuse_if_shared(version)
        if self.in_place:
            self._updating = True
            self.llm.collective_rpc(load_in_place, args=(tensors,))
            self._updating = False
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
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
            if not self.in_place:
                raise RuntimeError(f"generator {self.id}: shared-memory weights need vLLM's plain CPU layout "
                                   f"(actors.cpu_weight_layout: plain, on CPU), not {self.cfg.cpu_weight_layout!r}")
            from transport.shared_slots import read_checkpoint

            self._layout = self.llm.collective_rpc(layout_of, args=(read_checkpoint(self.model_path),))[0]
        return self._layout

    def attach_slot(self, version: int, slot, layout: dict) -> None:
        """Serve a whole version from a shared-memory slot (transport/shared_slots.py) without copying: the
        parameters become views of it. Checked whole before anything changes, so a bad version leaves the old
        one served."""
        self.llm.collective_rpc(point_at, args=([(r["name"], slot.view(r)) for r in layout["regions"]],))
        self._shared = True
        self.llm.reset_prefix_cache()
        self.version = version

    # vLLM's weight-transfer engine API, driven by a trainer-side transport (transport/engine.py). The engine
    # named by `weight_transfer_backend` receives the data (NCCL on GPU); these only relay the control plane.
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def start_weight_update(self) -> None:
        self._updating = True  # until finish: the engine may hold a mix of versions and must not serve
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict | list[dict]) -> None:
        self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()
        if weight_version is not None:
            self.version = int(weight_version)
        self._updating = False

    def apply_weight_update(self, update_info: dict | list[dict], weight_version: str) -> None:
        """start, update and finish as one call, so a single-threaded actor runs no request in between."""
        self.start_weight_update()
        self.update_weights(update_info)
        self.finish_weight_update(weight_version)

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.collective_rpc("shutdown_weight_transfer_engine")

    def _check_whole(self) -> None:
        if self._updating:
            raise RuntimeError(f"generator {self.id}: a weight update after version {self.version} started and "
                               "did not finish; its weights may mix two versions, so it does not serve")

    def sampling_params(self, greedy: bool = False):
        from vllm import SamplingParams

        return SamplingParams(
            n=1 if greedy else self.cfg.n,
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k if self.cfg.top_k > 0 else -1,
            max_tokens=self.cfg.max_tokens,
            logprobs=0,  # the sampled token's own entry only
        )

    def generate(self, prompts: list[Prompt]) -> GenerationResult:
        self._check_whole()
        t0, loading0 = time.time(), self._loading_s()
        skipped: Counter[str] = Counter()
        kept, token_prompts = [], []
        for p in prompts:
            ids = self.tokenizer(p.text, add_special_tokens=False)["input_ids"]
            if len(ids) + self.cfg.max_tokens > self.max_model_len or not ids:
                skipped["prompt_too_long" if ids else "prompt_empty"] += 1
                continue
            kept.append(p)
            token_prompts.append(ids)
        outputs = self._sample_batch(token_prompts) if kept else []
        rows: list[Rollout] = []
        for p, out in zip(kept, outputs):
            group, reason = self._group(p, out, t0)
            if reason:
                skipped[reason] += 1
            else:
                rows.extend(group)
        batch = rollouts_to_arrow(rows) if rows else None
        tokens = sum(len(r.behaviour_logprobs) for r in rows)
        return GenerationResult(batch, len(rows) // self.cfg.n, tokens, self.version, time.time() - t0,
                                self._loading_s() - loading0, dict(skipped))

    def _sample_batch(self, token_prompts: list[list[int]]) -> list:
        """One vLLM output per prompt, n completions each."""
        prompts = [{"prompt_token_ids": ids} for ids in token_prompts]
        return self.llm.generate(prompts, self.sampling_params(), use_tqdm=False)

    def _loading_s(self) -> float:
        """Seconds this engine has spent loading weights while requests ran (never, here: between requests only)."""
        return 0.0

    def _group(self, prompt: Prompt, out, t_start: float) -> tuple[list[Rollout], str]:
        """One prompt's n samples as Rollouts; a group with unusable samples is dropped whole (with a reason)
        because group-relative objectives need every member."""
        group_id = uuid.uuid4().hex
        rows = []
        for comp in out.outputs:
            ids = list(comp.token_ids)
            if not ids:
                return [], "empty_generation"
            logps = [lp[tok].logprob for lp, tok in zip(comp.logprobs, ids)]
            if not all(math.isfinite(x) for x in logps):
                return [], "nonfinite_logprobs"
            reward, info = safe_reward(self.reward_fn, comp.text, prompt.answer)
            rows.append(
                Rollout(
                    rollout_id=uuid.uuid4().hex,
                    prompt_id=prompt.id,
                    group_id=group_id,
                    group_size=self.cfg.n,
                    token_ids=list(out.prompt_token_ids) + ids,
                    prompt_len=len(out.prompt_token_ids),
                    behaviour_logprobs=logps,
                    reward=reward,
                    policy_version=self.version,
                    generator_id=self.id,
                    finish_reason=comp.finish_reason or "stop",
                    t_start=t_start,
                    t_end=time.time(),
                    response_text=comp.text,
                    reward_info=info,
                )
            )
        return rows, ""

    def evaluate(self, prompts: list[Prompt]) -> dict[str, float]:
        """Greedy decoding on held-out prompts: mean reward and response length."""
        self._check_whole()
        outs = self.llm.generate([p.text for p in prompts], self.sampling_params(greedy=True), use_tqdm=False)
        scores = [safe_reward(self.reward_fn, o.outputs[0].text, p.answer)[0] for p, o in zip(prompts, outs)]
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        return {"eval/reward_mean": sum(scores) / len(scores), "eval/response_length_mean": sum(lengths) / len(lengths)}
