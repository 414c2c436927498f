"""In-flight weight updates: the engine whose weights can change while a generation is running.

Why a second engine: `SyncEngine` drives vLLM's synchronous `LLM`, so new weights can only be applied
between batches, and a long generation keeps sampling from weights the learner has long replaced.
`AsyncEngine` runs vLLM's async engine on an event loop in a background thread; `load` may be called
from another thread at any time and does pause (`mode="keep"`, KV and prefix caches cleared) -> load
-> resume. Kept requests continue under the new weights: their context is recomputed from scratch,
since KV computed under the old weights must not be mixed with the new ones (measured:
`clear_cache=False` yields tokens matching neither version).

Each response token then carries the version that sampled it. The split is not guessed from when
streamed outputs arrived (outputs of the last step before the pause can arrive after it): the engine
core labels every step's outputs with its weight version, which we set while paused, and vLLM
returns contiguous (version, start, end) spans per completion. The `Generator` makes a row's
`policy_version` its oldest token's version, which is what the buffer's staleness bound measures.

The async engine always runs as a separate process (~16 s to start on CPU), which cannot receive
tensors as RPC arguments: weights travel as a safetensors file in /dev/shm and a worker extension
(`RelayWorkerExtension`, imported by that process from `WORKER_EXTENSION`) loads them: copied into
place with the default plain CPU layout (transport/plain_weights.py), else through vLLM's layerwise
reload.
"""
from __future__ import annotations

import asyncio
import gc
import os
import shutil
import tempfile
import threading
import time
import uuid

from actors.config import ActorConfig
from actors.engines import Completion, Output, engine_args, response_texts, sampled_logprobs

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


class AsyncEngine:
    """vLLM's `AsyncLLM` on its own event loop; `load` and `attach_slot` are thread-safe and may run
    while `sample` is blocked in another thread."""

    def __init__(self, cfg: ActorConfig, model_path: str, generator_id: str, max_model_len: int, version: int = 0,
                 engine_kwargs: dict | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        os.environ[LAYOUT_ENV] = cfg.cpu_weight_layout if current_platform.is_cpu() else "packed"
        self.id, self.model_path = generator_id, model_path
        self._lock = threading.Lock()  # one weight swap at a time, applied in call order
        self._paused_s = 0.0  # total time spent in weight swaps (generation stood still)
        self._streamed: dict[tuple[str, int], int] = {}  # (request, sample) -> tokens received so far
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{generator_id}-vllm", daemon=True)
        self._thread.start()
        self.llm = None
        args = AsyncEngineArgs(**engine_args(cfg, model_path, generator_id, max_model_len,
                                             worker_extension_cls=WORKER_EXTENSION, disable_log_stats=True,
                                             **(engine_kwargs or {})))
        self._run(self._start(args, version))
        self.tokenizer = self.llm.get_tokenizer()

    # ---- the event loop -------------------------------------------------------------------------
    def _run(self, coro):
        """Run `coro` on the engine's loop and wait for it; callable from any thread but the loop's."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self, args, version: int) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        # built inside the loop, so its output handler runs here; kept off this frame's locals, which outlive
        # the call and would keep the engine alive past close()
        self.llm = AsyncLLM.from_engine_args(args)
        await self.llm.update_weight_version(str(version))  # every output is labelled from the start

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        """A `RelayWorkerExtension` method in every worker of the engine process."""
        return self._run(self.llm.collective_rpc(method, args=args))

    def close(self) -> None:
        """Stop the engine process (it otherwise leaves /dev/shm segments behind) and the loop thread."""
        if self._thread.is_alive():
            self._run(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self.llm = None
        gc.collect()  # AsyncLLM sits in reference cycles: collect it now, not at interpreter exit (a noisy __del__)

    async def _shutdown(self) -> None:
        self.llm.shutdown()

    # ---- weights ----------------------------------------------------------------------------------
    def load(self, version: int, tensors: list) -> None:
        """Apply a whole version now, also in the middle of a running `sample`: tokens sampled after this
        returns are from `version`, tokens before from the previous one."""
        with self._lock:
            path = _write_safetensors(tensors)
            try:
                self._swap_timed(version, "relay_load_safetensors", path)
            finally:
                os.unlink(path)

    def layout(self) -> dict:
        """Computed in the engine process, which holds the model."""
        if os.environ.get(LAYOUT_ENV) != "plain":
            raise RuntimeError(f"generator {self.id}: shared-memory weights need vLLM's plain CPU layout "
                               f"(actors.cpu_weight_layout: plain, on CPU), not {os.environ.get(LAYOUT_ENV)!r}")
        return self.collective_rpc("relay_slot_layout", (self.model_path,))[0]

    def attach_slot(self, version: int, slot, layout: dict) -> None:
        """Serve a shared-memory slot now, also mid-generation (pause, point the parameters at it, resume);
        the engine process maps the slot itself, with the layout it computed."""
        with self._lock:
            self._swap_timed(version, "relay_attach_slot", slot.path)

    def loading_s(self) -> float:
        return self._paused_s  # generation stood paused for in-flight swaps

    def _swap_timed(self, version: int, method: str, arg) -> None:
        t0 = time.perf_counter()
        self._run(self._swap(version, method, arg))
        self._paused_s += time.perf_counter() - t0

    async def _swap(self, version: int, method: str, arg) -> None:
        await self.llm.pause_generation(mode="keep", clear_cache=True)
        try:
            await self.llm.collective_rpc(method, args=(arg,))
            await self.llm.update_weight_version(str(version))  # labels the outputs of every later step
        except BaseException:
            # half-loaded weights must not sample under either label: stop the engine, so every waiting
            # sample raises instead of hanging on a paused engine
            self.llm.shutdown()
            raise
        await self.llm.resume_generation()

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self, token_prompts: list[list[int]], params) -> list[Output]:
        from vllm.sampling_params import RequestOutputKind

        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA  # progress is visible while a request runs
        return self._run(self._sample_all(token_prompts, params))

    def progress(self) -> dict[tuple[str, int], int]:
        """Tokens received so far per (request, sample) of the running `sample` (from the delta stream)."""
        return dict(self._streamed)

    async def _sample_all(self, token_prompts: list[list[int]], params) -> list[Output]:
        return await asyncio.gather(*(self._sample_one(ids, params) for ids in token_prompts))

    async def _sample_one(self, prompt_ids: list[int], params) -> Output:
        request = uuid.uuid4().hex
        done: dict[int, Completion] = {}
        async for out in self.llm.generate({"prompt_token_ids": prompt_ids}, params, request_id=request):
            for c in out.outputs:  # deltas: only the tokens new since the last output
                acc = done.setdefault(c.index, Completion([], [], "", None))
                acc.token_ids.extend(c.token_ids)
                acc.logprobs.extend(sampled_logprobs(c.token_ids, c.logprobs or []))
                acc.text += c.text
                self._streamed[(request, c.index)] = len(acc.token_ids)
                if c.finish_reason is not None:
                    acc.finish_reason = c.finish_reason
                    acc.versions = token_versions_from_spans(c.weight_versions, len(acc.token_ids), request)
        for index in done:
            self._streamed.pop((request, index), None)
        completions = [done[i] for i in sorted(done)]
        if not params.detokenize:  # the deltas carried no text: decode each whole response once
            for c, text in zip(completions, response_texts(self.tokenizer, params, completions)):
                c.text = text
        return Output(list(prompt_ids), completions)
