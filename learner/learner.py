"""The learner: a DeepSpeed engine that recomputes log-probs, applies the objective and publishes weights.

A plain class, one per data-parallel rank; `learner/actor.py` wraps it as a Ray
actor. Every rank receives the same sampled batch and trains on its own whole
groups; metrics are averaged over ranks.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.seeding import seed_everything
from learner.batch import TrainBatch, micro_batches, response_logprobs, shard_groups, staleness_stats, to_tensors
from learner import lora
from learner.config import LearnerConfig
from learner.mismatch import by_generator, token_mismatch
from learner.objectives import (LossInputs, compute_loss, needs_proximal, needs_reference, needs_whole_groups,
                                step_context)
from learner.objectives.config import READS
from learner.objectives.registry import resolve
from learner.pretrained import write_pretrained
from learner.safe_state import SafetensorsCheckpointEngine

if TYPE_CHECKING:  # pyarrow only for the type: the learner benchmark runs on torch, transformers and DeepSpeed alone
    import pyarrow as pa


def zero_config(cfg: LearnerConfig) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero3_persistence_threshold is not None:  # DeepSpeed's default keeps every small parameter whole
        zero["stage3_param_persistence_threshold"] = cfg.zero3_persistence_threshold
    return zero


def deepspeed_config(cfg: LearnerConfig, rows_per_micro: int) -> dict:
    ds = {
        # The number of micro-batches varies from step to step (token budget), so the learner owns the
        # accumulation boundary: every backward accumulates, step() reduces and updates once. Each micro-batch's
        # loss is already its share of the step's (LossInputs.step): DeepSpeed must not divide it again.
        "managed_gradient_accumulation": False,
        "train_micro_batch_size_per_gpu": rows_per_micro,  # nominal: only DeepSpeed's sample counter reads it
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay}},
        "zero_optimization": zero_config(cfg),
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.warmup_steps:
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
                                                          "warmup_num_steps": cfg.warmup_steps}}
    return ds


def fill_behaviour(behaviour: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None,
                   fill: str) -> torch.Tensor:
    """Behaviour log-probs (B, T) with every unknown (non-finite) entry replaced, so nothing non-finite reaches a
    loss: by the reference model's log-probs (`learner.behaviour_fill: reference`: it produced those rows), else
    by the learner's own detached ones (ratio 1: the row is treated as on-policy)."""
    unknown = ~torch.isfinite(behaviour)  # (B, T)
    if not bool(unknown.any()):
        return behaviour
    if fill == "reference" and ref_logp is None:
        raise ValueError("learner.behaviour_fill is reference, but no reference log-probs were computed")
    source = ref_logp if fill == "reference" else logp.detach().float()  # (B, T)
    return torch.where(unknown, source, behaviour)


class Learner:
    def __init__(self, cfg: LearnerConfig, model_path: str, group_size: int, temperature: float,
                 rank: int = 0, world_size: int = 1):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer

        objective = resolve(cfg.objective)
        if objective.aggregation == "token_sum" and "max_len" in READS[objective.name] and objective.max_len is None:
            raise ValueError(f"learner.objective.max_len: {objective.name} aggregates with token_sum, which divides by "
                             "B * max_len; set it (the launcher sets actors.max_tokens) so the constant does not "
                             "depend on the batch")
        self.cfg, self.model_path, self.temperature = cfg, model_path, temperature
        self.rank, self.world_size = rank, world_size
        # The same seed on every rank: weights a model initialises rather than loads must agree across ranks.
        seed_everything(cfg.seed)
        if cfg.num_threads is not None:  # OMP_NUM_THREADS (learner/actor.py) sets the pool; a plain Learner too
            torch.set_num_threads(cfg.num_threads)
        on_gpu = torch.cuda.is_available() and cfg.num_gpus > 0
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:  # before DeepSpeed wraps the model; non-reentrant also works under ZeRO-3
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:  # base weights frozen: DeepSpeed below gets (and its optimizer holds) adapters only
            model = lora.wrap(model, cfg.lora)
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id or 0
        groups_per_rank = cfg.groups_per_step // world_size
        self.rows_per_micro = min(cfg.micro_batch_groups, groups_per_rank) * group_size
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, self.rows_per_micro),
        )
        self.engine.checkpoint_engine = SafetensorsCheckpointEngine()  # resumable state without pickles
        if world_size == 1 and cfg.zero_stage == 0:  # ZeRO 1-3 finalise their partitions in the same call
            # One rank: DeepSpeed's all-reduce would flatten, divide by 1 and copy back every gradient per step.
            self.engine.enable_backward_allreduce = False
        self.engine.train()  # from_pretrained returns eval mode, in which transformers skips gradient checkpointing
        self.ref = None
        # With LoRA the reference is the base model: the policy with its adapter disabled, no second copy.
        wants_ref = needs_reference(cfg.objective) or cfg.track_ref_kl or cfg.behaviour_fill == "reference"
        self.ref_is_base = cfg.lora is not None and wants_ref
        if cfg.lora is None and wants_ref:
            self.ref = self._load_reference(dtype)
        self.step = 0  # optimizer steps taken == the version of the weights this learner holds
        self.times: dict[str, float] = {}  # seconds of the last step's parts (train_tensors)
        self._readers: list = []  # publishes still reading the live parameters (callables that wait for them)

    def _load_reference(self, dtype: torch.dtype):
        """The frozen reference: a plain module under ZeRO 0-2; under ZeRO-3 an optimizer-less DeepSpeed engine
        whose parameters are partitioned across ranks like the policy's (not a full copy per rank)."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        ref.config.use_cache = False
        ref.requires_grad_(False)
        if self.cfg.zero_stage != 3:
            return ref.to(self.device).eval()
        config = {"train_micro_batch_size_per_gpu": self.rows_per_micro, "zero_optimization": zero_config(self.cfg),
                  "bf16": {"enabled": self.cfg.dtype == "bfloat16"}, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=ref, config=config)
        engine.eval()
        return engine

    # ---- training -------------------------------------------------------------------------------
    def _forward(self, model, mb: TrainBatch):
        """Response log-probs (B, T) with grad and entropies (B, T) from the model's last hidden state.

        `model` is a DeepSpeed engine (the policy's, or a ZeRO-3 reference's), its module or the reference.
        An engine is called itself, so its forward runs as DeepSpeed expects: ZeRO-3 fetches parameters, and the
        backward prologue (ZeRO's reduction bookkeeping) hangs on its outputs. Only the decoder's last hidden
        state is kept (a hook, not output_hidden_states, which holds every layer's); it is added to the causal
        LM's output so the engine's output hooks see the tensor the loss flows through. The causal LM's own head
        runs on one position (logits_to_keep=1); response_logprobs applies it to the response positions.
        """
        module = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
        captured: dict[str, torch.Tensor] = {}

        def keep(_m, _args, out):
            captured["h"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

        def expose(_m, _args, out):
            out["last_hidden_state"] = captured["h"]
            return out

        hooks = [module.get_decoder().register_forward_hook(keep), module.register_forward_hook(expose)]
        input_ids = mb.input_ids.to(self.device)  # (B, L)
        try:  # the head below stays outside autocast: its log-probs are fp32 (response_logprobs)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast_bf16):
                model(input_ids=input_ids, attention_mask=mb.attention_mask.to(self.device), logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        hidden = captured["h"]  # (B, L, H) after the final norm, what the head reads
        return response_logprobs(hidden, module.get_output_embeddings(), input_ids, mb.resp_index.to(self.device),
                                 mb.resp_mask.to(self.device), self.temperature, self.cfg.logprob_chunk_tokens,
                                 fp32_head=True)

    def _plan(self, full: TrainBatch) -> list[torch.Tensor]:
        return micro_batches(full, self.cfg.micro_batch_groups, self.cfg.max_tokens_per_micro_batch,
                             needs_whole_groups(self.cfg.objective))

    @torch.no_grad()
    def _frozen_logp(self, model, full: TrainBatch, plan: list[torch.Tensor]) -> torch.Tensor:
        """Log-probs (B, T) of the step's rows under a frozen model, micro-batch by micro-batch."""
        out = torch.zeros(full.resp_mask.shape)  # (B, T)
        for rows in plan:
            logp = self._forward(model, full.take(rows))[0].float().cpu()  # (b, t)
            out[rows, :logp.shape[1]] = logp
        return out

    def _reference_logp(self, full: TrainBatch, plan: list[torch.Tensor]) -> torch.Tensor | None:
        """Log-probs (B, T) under the reference: the frozen copy, or with LoRA the policy with its adapter disabled."""
        if not self.ref_is_base:
            return self._frozen_logp(self.ref, full, plan) if self.ref is not None else None
        self.engine.eval()
        try:
            with self.engine.module.disable_adapter():
                return self._frozen_logp(self.engine.module, full, plan)
        finally:
            self.engine.train()

    def train_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        """One optimizer step (or `updates_per_batch`) on this rank's groups of `batch`; returns rank-averaged metrics."""
        t0 = time.perf_counter()
        mine = shard_groups(batch, self.rank, self.world_size)
        metrics = self.train_tensors(to_tensors(mine, self.pad_id), t0)
        # per generator, this rank's rows: which generator is off is what an operator needs to know
        self.mismatch = by_generator(self.mismatch_rows, mine.column("generator_id").to_pylist())
        return metrics

    def train_tensors(self, full: TrainBatch, t0: float | None = None) -> dict[str, float]:
        """train_step on this rank's rows as tensors; `t0` is when the step started (for learner_step_s)."""
        t0 = time.perf_counter() if t0 is None else t0
        plan = self._plan(full)
        ref_logp = self._reference_logp(full, plan)
        prox_logp = None
        if needs_proximal(self.cfg.objective) or self.cfg.updates_per_batch > 1:
            self.engine.eval()
            prox_logp = self._frozen_logp(self.engine.module, full, plan)  # the policy before this update
            self.engine.train()
        self.times = {"prepare": time.perf_counter() - t0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        sums: dict[str, float] = {}
        loss, waited = 0.0, 0.0
        self.mismatch_rows = torch.zeros(len(full), 3)  # (B, 3) tokens of this very version: see learner/mismatch.py
        for update in range(self.cfg.updates_per_batch):
            loss_u, metrics = self.accumulate(full, plan, ref_logp, prox_logp, measure=update == 0)
            waited += self.release_weights()  # the update below overwrites what a publish may still be reading
            t_opt = time.perf_counter()
            self.engine.step()
            self.times["optimizer"] += time.perf_counter() - t_opt
            loss += loss_u / self.cfg.updates_per_batch
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / self.cfg.updates_per_batch
        self.step += 1
        lengths = full.resp_mask.sum(1)
        m = self.mismatch_rows.sum(0)  # [sum |Δ|, sum k3, tokens]
        out = {**sums, "loss": loss, "micro_batches": float(len(plan)), "mismatch_tokens": float(m[2]),
               "mismatch_abs_mean": float(m[0] / m[2].clamp(min=1)), "mismatch_k3": float(m[1] / m[2].clamp(min=1))}
        out.update(
            reward_mean=float(full.rewards.mean()), response_length_mean=float(lengths.mean()),
            **staleness_stats(full, self.step - 1),  # per token: learner version at the update minus the sampler's
            tokens=float(lengths.sum()), rows=float(len(full)),
            learner_step_s=time.perf_counter() - t0, lr=float(self.engine.get_lr()[0]),
            weight_sync_wait_s=waited,  # how long this step waited for the previous publish to finish reading
            # Where the step went (wall seconds; on a GPU, kernels still running are counted where they are awaited).
            # prepare: Arrow to tensors, the plan, reference / proximal passes; forward includes the objective.
            **{f"learner_{k}_s": v for k, v in self.times.items()},
        )
        return self._all_reduce(out)

    def accumulate(self, full: TrainBatch, plan: list[torch.Tensor], ref_logp: torch.Tensor | None,
                   prox_logp: torch.Tensor | None, measure: bool = False) -> tuple[float, dict[str, float]]:
        """Forward and backward every micro-batch of `plan`, accumulating the step's gradient (no update).

        Each micro-batch's loss is its share of the step's loss (LossInputs.step), so the gradients sum to the
        step's whatever the split. Returns the step's loss and the other metrics averaged over micro-batches."""
        ctx = step_context(full.rewards.to(self.device), full.group_ids.to(self.device), full.resp_mask.to(self.device))
        sums: dict[str, float] = {}
        total = 0.0
        for rows in plan:
            t_fwd = time.perf_counter()
            mb = full.take(rows)
            logp, entropy = self._forward(self.engine, mb)  # (b, t), (b, t)
            mask, width = mb.resp_mask.to(self.device), mb.resp_mask.shape[1]
            ref = None if ref_logp is None else ref_logp[rows, :width].to(self.device)  # (b, t)
            behaviour = mb.behaviour_logp.to(self.device)  # (b, t), NaN where unknown (offline rows)
            inputs = LossInputs(
                logp=logp.float(), behaviour_logp=fill_behaviour(behaviour, logp, ref, self.cfg.behaviour_fill),
                mask=mask, rewards=mb.rewards.to(self.device), group_ids=mb.group_ids.to(self.device),
                ref_logp=ref,
                prox_logp=None if prox_logp is None else prox_logp[rows, :width].to(self.device),
                step=ctx.at(rows),
            )
            if measure:  # before any update of this step: the weights are version self.step
                same = (mb.token_versions.to(self.device) == self.step) & (mask > 0)  # (b, t)
                self.mismatch_rows[rows] = token_mismatch(logp, behaviour, same)  # unknown (NaN) ones are ignored
            loss, metrics = compute_loss(self.cfg.objective, inputs)
            t_bwd = time.perf_counter()
            self.engine.backward(loss)
            self.times["forward"] += t_bwd - t_fwd
            self.times["backward"] += time.perf_counter() - t_bwd
            total += float(loss.detach())
            metrics = {**metrics, "entropy_mean": float((entropy * mask).sum() / mask.sum().clamp(min=1))}
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(plan)
        sums.pop("loss", None)
        return total, sums

    def _all_reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        import torch.distributed as dist

        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        summed = ("tokens", "rows")
        maxed = ("staleness_max", "behaviour_version_max")
        out = {k: float(v) if k in summed else float(v) / self.world_size for k, v in zip(keys, t.tolist())}
        for k in maxed:  # a max across ranks, not a mean
            m = torch.tensor([metrics[k]], dtype=torch.float64, device=self.device)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            out[k] = float(m)
        return out

    # ---- weights --------------------------------------------------------------------------------
    def full_state(self, copy: bool = True) -> dict[str, torch.Tensor] | None:
        """Full parameters (and persistent buffers) on CPU on rank 0; None elsewhere. Every rank must
        call: under ZeRO-3 the gather is a collective. Tied weights appear under every name that refers to
        them (`lm_head.weight` and `model.embed_tokens.weight`), because vLLM repacks its head separately.
        copy=False returns views of the live CPU parameters under ZeRO 0-2 (ZeRO-3's gathered storage is
        always copied): only for a consumer that is done with them before the next optimizer step."""
        import deepspeed

        module = self.engine.module
        zero3 = self.cfg.zero_stage == 3  # ZeRO 0-2 keep full parameters on every rank; 3 partitions them
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero3):
            if self.rank != 0:
                return None
            # copies: gathered ZeRO-3 storage is freed on exit, and ZeRO 0-2 storage changes at the next step
            copy = copy or zero3
            if self.cfg.lora is not None:  # merged W + B A * scale under the base names (lora.sync merged)
                state = lora.merged_state(module, copy)
            else:
                state = {name: p.detach().to("cpu", copy=copy)
                         for name, p in module.named_parameters(remove_duplicate=False)}
        for name, buf in module.named_buffers(remove_duplicate=False):
            owner, _, leaf = name.rpartition(".")
            if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
                state[lora.base_name(name)] = buf.detach().to("cpu", copy=copy)
        return state

    def adapter_state(self) -> dict[str, torch.Tensor] | None:
        """The LoRA adapter's tensors (PEFT names, CPU copies) on rank 0, None elsewhere; every rank must call."""
        import deepspeed

        module = self.engine.module
        params = [p for name, p in module.named_parameters() if lora.is_adapter(name)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.zero_stage == 3):
            return lora.adapter_state(module) if self.rank == 0 else None

    def hold_weights(self, wait) -> None:
        """A publish goes on reading the live parameters after it returned (object-store publishing copies them
        on another thread): `wait()` returns once it is done. The next optimizer update calls it first, so the
        learner trains the next batch's forward and backward while the copy runs and waits only if it is late."""
        self._readers.append(wait)

    def release_weights(self) -> float:
        """Wait for every publish still reading the parameters; returns the seconds waited."""
        t0 = time.perf_counter()
        while self._readers:
            self._readers.pop(0)()
        return time.perf_counter() - t0

    def publish(self, transport, defer=None):
        """Hand the current weights to `transport` as version `self.step`; every rank must call (ZeRO-3 gathers).
        Returns (the handle on rank 0, None elsewhere; seconds spent).

        No snapshot copy under ZeRO 0-2: the transport reads the live parameters, either before publish returns
        or, through `defer` (`LearnerRank._defer`), on another thread that the next optimizer update waits for
        (`hold_weights`)."""
        t0 = time.perf_counter()
        if lora.sends_adapter(self.cfg.lora, transport):  # the adapter alone, PEFT's names and config (copies)
            adapter = self.adapter_state()
            handle = None if adapter is None else transport.publish_adapter(
                self.step, lora.peft_saved(adapter), lora.peft_config(self.engine.module), defer=defer)
            return handle, time.perf_counter() - t0
        state = self.full_state(copy=False)
        if state is None:
            return None, 0.0
        handle = transport.publish(self.step, state, defer=defer)
        return handle, time.perf_counter() - t0

    def save_pretrained(self, out_dir: str, merge: bool | None = None) -> str | None:
        """Hugging Face format (safetensors) that transformers and vLLM both load; written then renamed. With LoRA:
        the adapter in PEFT's format under `adapter/`, and the merged full weights at the top if `merge` (None: as
        a resumed run's generators load them: unless lora.sync is adapter). Every rank must call."""
        L = self.cfg.lora
        adapter = self.adapter_state() if L is not None else None
        merge = L is None or (L.sync != "adapter" if merge is None else merge)
        state = self.full_state() if merge else None  # a collective under ZeRO-3: every rank or none
        if self.rank != 0:
            return None
        return write_pretrained(out_dir, self.engine.module, state, adapter, self.model_path)

    # ---- resumable state -----------------------------------------------------------------------
    def save_checkpoint(self, directory: str) -> None:
        """Optimizer, scheduler, (partitioned) parameters, step and RNG for an exact resume; every rank must call.

        DeepSpeed decides what each ZeRO stage saves; `learner/safe_state.py` writes it as safetensors + JSON
        (no pickles). The weights users and generators load are written separately by `save_pretrained`."""
        # With LoRA the frozen base is the model directory's: only the adapters (and their optimizer) are saved.
        self.engine.save_checkpoint(directory, tag="state", save_latest=False,
                                    client_state={"step": self.step, "torch_rng": torch.get_rng_state()},
                                    exclude_frozen_parameters=self.cfg.lora is not None)
        if self.rank == 0:  # DeepSpeed's recovery scripts read pickles only; model/ holds the full weights
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                Path(directory, script).unlink(missing_ok=True)

    def load_checkpoint(self, directory: str) -> int:
        """Restore what `save_checkpoint` wrote; returns the restored step (the policy version)."""
        self.release_weights()
        # LoRA checkpoints hold no frozen base weights, so the module load is not strict (they stay as loaded)
        path, client = self.engine.load_checkpoint(directory, tag="state", load_module_strict=self.cfg.lora is None)
        if path is None:
            raise FileNotFoundError(f"learner checkpoint {directory}: no DeepSpeed state under tag 'state'")
        self.step = int(client["step"])
        torch.set_rng_state(client["torch_rng"])
        return self.step
