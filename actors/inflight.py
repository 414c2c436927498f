"""In-flight weight updates: a generator whose weights can change while a generation is running.

Why a second generator: the default `Generator` drives vLLM's synchronous `LLM`, so new weights can
only be applied between batches, and a long generation keeps sampling from weights the learner has
long replaced. Here vLLM's async engine runs on an event loop in a background thread; `load_weights`
may be called from another thread at any time and does pause (`mode="keep"`, KV and prefix caches
cleared) -> load -> resume. Kept requests continue under the new weights: their context is
recomputed from scratch, since KV computed under the old weights must not be mixed with the new
ones (measured: `clear_cache=False` yields tokens matching neither version).

Each response token then carries the version that sampled it. The split is not guessed from when
streamed outputs arrived (outputs of the last step before the pause can arrive after it): the engine
core labels every step's outputs with its weight version, which we set while paused, and vLLM
returns contiguous (version, start, end) spans per completion. `policy_version` of a row is its
oldest token's version, which is what the buffer's staleness bound measures.

The async engine always runs as a separate process (~16 s to start on CPU), which cannot receive
tensors as RPC arguments: weights travel as a safetensors file in /dev/shm and a worker extension
loads them: copied into place with the default plain CPU layout (transport/plain_weights.py), else
through vLLM's layerwise reload.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import shutil
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field

from actors.config import ActorConfig
from actors.generator import Generator, Prompt
from actors.rewards import resolve_reward
from buffer.schema import Rollout

WORKER_EXTENSION = "actors.inflight.RelayWorkerExtension"
LAYOUT_ENV = "RELAY_CPU_WEIGHT_LAYOUT"  # actors.cpu_weight_layout, handed to the engine process

if os.environ.get(LAYOUT_ENV) == "plain":
    # vLLM's engine process imports this module (as worker_extension_cls) before it loads the model
    from transport.plain_weights import set_cpu_weight_layout

    set_cpu_weight_layout("plain")


class RelayWorkerExtension:
    """Mixed into vLLM's worker class in the engine process (by `worker_extension_cls`)."""

    def relay_load_safetensors(self, path: str) -> int:
        """Load a full checkpoint-format state from a safetensors file in place; returns tensors loaded. Plain CPU
        weights (transport/plain_weights.py) are copied into place; otherwise vLLM's layerwise reload repacks."""
        from safetensors import safe_open

        from transport import plain_weights

        with safe_open(path, framework="pt") as f:
            tensors = [(name, f.get_tensor(name)) for name in f.keys()]
        if plain_weights.active():
            return plain_weights.copy_into(self.model_runner.get_model(), tensors)
        self.reload_weights(weights_iterator=iter(tensors), is_checkpoint_format=True)
        return len(tensors)

    def relay_slot_layout(self, model_path: str) -> dict:
        """The shared-memory slot layout of this engine's model, checked against the checkpoint it loaded."""
        from transport.shared_slots import read_checkpoint, vllm_layout

        self.relay_layout = vllm_layout(self.model_runner.get_model(), read_checkpoint(model_path))
        return self.relay_layout

    def relay_attach_slot(self, path: str) -> int:
        """Serve the version in the slot file at `path` without copying (the parameters become views of this
        process's own mapping of it, kept for the next time the slot comes round); the rollout actor holds the
        slot's lock."""
        from transport import plain_weights
        from transport.shared_slots import Slot

        slots = self.__dict__.setdefault("relay_slots", {})
        if path not in slots:
            slots[path] = Slot(path, self.relay_layout["nbytes"])
        slot = slots[path]
        return plain_weights.point_at(self, [(r["name"], slot.view(r)) for r in self.relay_layout["regions"]])

    def relay_weight_layout(self) -> str:
        """How this engine process holds linear weights on CPU: "plain" or "packed"."""
        from transport import plain_weights

        return "plain" if plain_weights.active() else "packed"


def token_versions_from_spans(spans, n_tokens: int, request: str) -> list[int]:
    """vLLM's weight-version spans of one completion -> one version per response token.

    `spans` are (version, start, end) records covering [0, n_tokens) in order; the versions are the
    strings this generator gave the engine (str of an int)."""
    if not spans:
        raise RuntimeError(f"request {request}: vLLM returned no weight-version spans for {n_tokens} tokens")
    out: list[int] = []
    for s in spans:
        if s.start != len(out) or s.end < s.start:
            raise RuntimeError(f"request {request}: weight-version spans are not contiguous: {spans}")
        out.extend([int(s.version)] * (s.end - s.start))
    if len(out) != n_tokens:
        raise RuntimeError(f"request {request}: spans cover {len(out)} tokens, the completion has {n_tokens}")
    return out


@dataclass
class _Completion:
    """One sample accumulated from the engine's delta stream (duck-types vLLM's CompletionOutput)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)  # (T,) {token_id: Logprob}
    text: str = ""
    finish_reason: str | None = None
    versions: list[int] = field(default_factory=list)  # (T,) weight version that sampled each token


@dataclass
class _Output:
    prompt_token_ids: list[int]
    outputs: list[_Completion]


def _write_safetensors(named_tensors) -> str:
    """Serialise before pausing, so generation keeps running while this copy is made."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        # tied weights share storage, which safetensors refuses; both names must reach vLLM's repacked head
        tensors[name] = t.clone() if t.data_ptr() in seen else t
        seen.add(t.data_ptr())
    if not tensors:
        raise ValueError("load_weights: no tensors given")
    nbytes = sum(t.nbytes for t in tensors.values())
    # /dev/shm is memory, so the engine's read is a copy from RAM; containers often give it only 64 MiB
    directory = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 2 * nbytes else None
    fd, path = tempfile.mkstemp(prefix="relay-weights-", suffix=".safetensors", dir=directory)
    os.close(fd)
    save_file(tensors, path)
    return path


class InflightGenerator(Generator):
    """`Generator`'s surface (generate, load_weights, evaluate, version) on vLLM's async engine.

    `load_weights` is thread-safe and may run while `generate` is blocked in another thread; the
    reward, grouping and skip rules are `Generator`'s own (inherited `_group`, `sampling_params`)."""

    def __init__(self, cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int, version: int = 0,
                 weight_transfer_backend: str | None = None, engine_kwargs: dict | None = None):
        # Generator.__init__ is not called: it builds the synchronous engine this class replaces.
        if weight_transfer_backend is not None:
            raise ValueError(f"generator {generator_id}: actors.weight_update_mode in_flight loads the versions its "
                             f"transport fetches (object_store, disk); the push engine {weight_transfer_backend!r} "
                             "is not wired to the pause/resume path")
        self._engine_kwargs = dict(engine_kwargs or {})
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm.platforms import current_platform

        os.environ[LAYOUT_ENV] = cfg.cpu_weight_layout if current_platform.is_cpu() else "packed"
        self.cfg, self.id, self.version, self.model_path = cfg, generator_id, version, model_path
        self._layout: dict | None = None
        self.max_model_len = max_model_len
        self.reward_fn = resolve_reward(cfg.reward)
        self._load_lock = threading.Lock()  # one weight swap at a time, applied in call order
        self._paused_s = 0.0  # total time spent in weight swaps (generation stood still)
        self._streamed: dict[tuple[str, int], int] = {}  # (request, sample) -> tokens received so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{generator_id}-vllm", daemon=True)
        self._thread.start()
        self.engine = None
        self._run(self._start(model_path))
        self.tokenizer = self.engine.get_tokenizer()

    # ---- the event loop -------------------------------------------------------------------------
    def _run(self, coro):
        """Run `coro` on the engine's loop and wait for it; callable from any thread but the loop's."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self, model_path: str) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model_path,
            dtype="float32",
            enforce_eager=True,
            max_model_len=self.max_model_len,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=self.cfg.enable_prefix_caching,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            seed=self.cfg.seed + zlib.crc32(self.id.encode()) % 10_000,  # distinct streams per actor
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
            **self._engine_kwargs,
        )
        # built inside the loop, so its output handler runs here; kept off this frame's locals, which outlive
        # the call and would keep the engine alive past close()
        self.engine = AsyncLLM.from_engine_args(args)
        await self.engine.update_weight_version(str(self.version))  # every output is labelled from the start

    def close(self) -> None:
        """Stop the engine process (it otherwise leaves /dev/shm segments behind) and the loop thread."""
        if self._thread.is_alive():
            self._run(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self.engine = None
        gc.collect()  # AsyncLLM sits in reference cycles: collect it now, not at interpreter exit (a noisy __del__)

    async def _shutdown(self) -> None:
        self.engine.shutdown()

    # ---- weights ----------------------------------------------------------------------------------
    def load_weights(self, version: int, named_tensors) -> None:
        """Apply a whole version now, also in the middle of a running `generate`: tokens sampled after
        this returns are from `version`, tokens before from the previous one."""
        self._refuse_if_shared(version)
        with self._load_lock:
            path = _write_safetensors(named_tensors)
            try:
                self._swap_timed(version, "relay_load_safetensors", path)
            finally:
                os.unlink(path)

    def weight_layout(self) -> dict:
        """`Generator.weight_layout`, computed in the engine process, which holds the model."""
        if self._layout is None:
            if os.environ.get(LAYOUT_ENV) != "plain":
                raise RuntimeError(f"generator {self.id}: shared-memory weights need vLLM's plain CPU layout "
                                   f"(actors.cpu_weight_layout: plain, on CPU), not {os.environ.get(LAYOUT_ENV)!r}")
            self._layout = self._run(self.engine.collective_rpc("relay_slot_layout", args=(self.model_path,)))[0]
        return self._layout

    def attach_slot(self, version: int, slot, layout: dict) -> None:
        """Serve a shared-memory slot now, also mid-generation (pause, point the parameters at it, resume)."""
        with self._load_lock:
            self._swap_timed(version, "relay_attach_slot", slot.path)
            self._shared = True

    def _swap_timed(self, version: int, method: str, arg) -> None:
        t0 = time.perf_counter()
        self._run(self._swap(version, method, arg))
        self._paused_s += time.perf_counter() - t0
        self.version = version

    async def _swap(self, version: int, method: str, arg) -> None:
        await self.engine.pause_generation(mode="keep", clear_cache=True)
        try:
            await self.engine.collective_rpc(method, args=(arg,))
            await self.engine.update_weight_version(str(version))  # labels the outputs of every later step
        except BaseException:
            # half-loaded weights must not sample under either label: stop the engine, so every waiting
            # generate raises instead of hanging on a paused engine
            self.engine.shutdown()
            raise
        await self.engine.resume_generation()

    # ---- sampling ---------------------------------------------------------------------------------
    def progress(self) -> dict[tuple[str, int], int]:
        """Tokens received so far per (request, sample) of the running `generate` (from the delta stream)."""
        return dict(self._streamed)

    async def _sample(self, prompt_ids: list[int], params) -> _Output:
        request = uuid.uuid4().hex
        done: dict[int, _Completion] = {}
        async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id=request):
            for c in out.outputs:  # deltas: only the tokens new since the last output
                acc = done.setdefault(c.index, _Completion(c.index))
                acc.token_ids.extend(c.token_ids)
                acc.logprobs.extend(c.logprobs or [])
                acc.text += c.text
                self._streamed[(request, c.index)] = len(acc.token_ids)
                if c.finish_reason is not None:
                    acc.finish_reason = c.finish_reason
                    acc.versions = token_versions_from_spans(c.weight_versions, len(acc.token_ids), request)
        for c in done.values():
            self._streamed.pop((request, c.index), None)
        return _Output(list(prompt_ids), [done[i] for i in sorted(done)])

    async def _sample_all(self, token_prompts: list[list[int]], params) -> list[_Output]:
        return await asyncio.gather(*(self._sample(ids, params) for ids in token_prompts))

    def sampling_params(self, greedy: bool = False):
        from vllm.sampling_params import RequestOutputKind

        params = super().sampling_params(greedy)
        params.output_kind = RequestOutputKind.DELTA  # progress is visible while a request runs
        return params

    # generate() is Generator's; only how a batch is sampled and what counts as load time differ
    def _sample_batch(self, token_prompts: list[list[int]]) -> list[_Output]:
        return self._run(self._sample_all(token_prompts, self.sampling_params()))

    def _loading_s(self) -> float:
        return self._paused_s  # generation stood paused for in-flight swaps

    def _group(self, prompt: Prompt, out: _Output, t_start: float) -> tuple[list[Rollout], str]:
        """`Generator._group`, then each row's per-token versions; policy_version becomes the oldest."""
        rows, reason = super()._group(prompt, out, t_start)
        return [dataclasses.replace(r, token_versions=c.versions, policy_version=min(c.versions))
                for r, c in zip(rows, out.outputs)], reason

    def evaluate(self, prompts: list[Prompt]) -> dict[str, float]:
        """Greedy decoding on held-out prompts: mean reward and response length."""
        from actors.rewards import safe_reward

        token_prompts = [self.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        outs = self._run(self._sample_all(token_prompts, self.sampling_params(greedy=True)))
        scores = [safe_reward(self.reward_fn, o.outputs[0].text, p.answer)[0] for p, o in zip(prompts, outs)]
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        return {"eval/reward_mean": sum(scores) / len(scores), "eval/response_length_mean": sum(lengths) / len(lengths)}
