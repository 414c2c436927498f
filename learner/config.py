"""Learner configuration."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.objectives import ObjectiveConfig


class LoraConfig(BaseModel):
    """Low-rank adapters (PEFT's LoRA) on the policy: the base weights stay frozen and the optimizer holds the
    adapters only. Generators receive the adapter alone (vLLM serves it on the base model) or merged full weights."""
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, gt=0)
    """Adapter rank r: each targeted (out, in) weight gains B (out, r) @ A (r, in)."""
    alpha: float = Field(32.0, gt=0)
    """Scale numerator: the update is B A * alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input during training (the recomputed log-probs then vary; 0 keeps them exact)."""
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)
    """Module names (suffixes) that get adapters, as PEFT reads them; "all-linear" = every linear but the head."""
    sync: Literal["auto", "adapter", "merged"] = "auto"
    """What each published version sends generators: adapter (the adapter's tensors only, served by vLLM's LoRA
    support; weights.transport object_store or disk, actors.weight_update_mode between_batches), merged (full
    weights W + B A * alpha / rank under the base names; every transport), or auto: adapter where the transport and
    engine mode allow it, else merged (resolved when the config is checked)."""
    merge_final: bool = False
    """Also write the merged full model (safetensors that transformers and vLLM load) to final/; the adapter in PEFT
    format (final/adapter/) is always written. `python -m launch.train --merge` sets it."""


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_ranks: int = Field(1, ge=1)
    """DeepSpeed data-parallel ranks, one Ray actor each."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each learner rank reserves from Ray."""
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op (OpenMP) threads in each learner rank. None: int(num_cpus), what Ray's OMP_NUM_THREADS gives
    (today's behaviour). More than num_cpus lets a CPU learner use cores that Ray has reserved for rollout actors
    but that those actors leave idle (a generator waiting on the staleness bound): it wins when the learner is the
    bottleneck, and loses while another process keeps those cores busy (the OpenMP threads then wait on each
    other); see the README's e2e_vs_trl_grpo figures."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs each learner rank reserves (1 on GPU clusters)."""
    resources: dict[str, float] = {}
    """Ray custom resources each learner rank's bundle reserves, e.g. {trainer_node: 1}."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    zero3_persistence_threshold: int | None = Field(None, ge=0)
    """ZeRO-3: parameters with fewer elements stay unpartitioned on every rank (None = DeepSpeed's ~1e5 default)."""
    total_steps: int = Field(800, ge=1)
    """Optimizer steps in the run."""
    groups_per_step: int = Field(16, ge=1)
    """Prompt groups in one optimizer step (rows = groups_per_step * actors.n)."""
    micro_batch_groups: int = Field(16, ge=1)
    """Groups per forward/backward when max_tokens_per_micro_batch is None; gradient accumulation covers the rest."""
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Token budget of one forward/backward: rows (whole groups for dpo, ipo and agro) sorted by length and packed
    while rows x longest sequence (prompt + response) fits; each micro-batch is padded to its own longest row.
    None: micro_batch_groups groups at a time. The step's gradient is the same either way."""
    updates_per_batch: int = Field(1, ge=1)
    """Optimizer passes over each sampled batch (PPO epochs); >1 makes proximal log-probs matter."""
    lr: float = Field(3e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient norm clip (0 = off)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up steps."""
    publish_every: Annotated[int, Field(ge=1)] | Literal["never"] = 1
    """Publish new weights every k optimizer steps (the semi-online sync period s); never: the generators keep the
    starting weights for the whole run (s = infinity: every rollout comes from the starting policy)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training precision (bf16 on GPU)."""
    autocast_bf16: bool = False
    """Run the model's forward (and so its backward) under torch.autocast in bfloat16 while weights, gradients and
    AdamW stay fp32, as TRL's bf16=True does; the head's log-probs stay fp32 (the precision fix above). For
    dtype float32 only. On a CPU with avx512_bf16 it made the e2e bench model's step ~2.4x faster on one thread."""
    objective: ObjectiveConfig = ObjectiveConfig()
    """The loss: see learner/objectives."""
    sample_timeout_s: float = Field(300.0, gt=0)
    """How long a step waits for the buffer to hold a batch before the run fails naming the buffer."""
    track_ref_kl: bool = False
    """Also hold a frozen reference model, only to report kl_to_ref, when the objective does not need one
    (it costs a second model in memory and a forward pass per step)."""
    behaviour_fill: Literal["policy", "reference"] = "policy"
    """What replaces unknown (NaN) behaviour log-probs, e.g. offline rows without them, before any loss: the
    learner's own current log-probs, detached (ratio 1), or the reference model's (loaded for it). The launcher
    sets reference when a data.offline source has `behaviour: reference`."""
    gradient_checkpointing: bool = False
    """Recompute each transformer layer's activations in backward instead of keeping them (transformers'
    gradient_checkpointing_enable): less memory on long sequences for about one more forward pass."""
    logprob_chunk_tokens: int = Field(256, ge=1)
    """Response tokens whose full-vocabulary logits are computed at once (and rebuilt in backward). Each chunk
    holds up to three fp32 (tokens, vocabulary) buffers: 256 x 151,936 x 4 B = 156 MB each for Qwen's vocabulary."""
    mismatch_warn: float = Field(0.1, gt=0)
    """Warn (events.jsonl) when a generator's tokens of the learner's own version get log-probs that differ from the
    learner's by more than this on average (|Δ log p|; fp32 ~1e-5, bf16 ~1e-2): it may serve other weights."""
    mismatch_abort: float | None = Field(None, gt=0)
    """Stop the run, naming the generator, past this mean |Δ log p| (None: warn only)."""
    checkpoint_every: int = Field(200, ge=0)
    """Save a resumable checkpoint (learner, weights, buffer, data position) every k steps; 0 = never."""
    checkpoint_keep: int = Field(2, ge=1)
    """Resumable checkpoints kept; older ones are deleted after a newer one is complete."""
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD"] = "PACK"
    """Ray placement group strategy for the ranks (one bundle each); STRICT_PACK keeps them on one node."""
    placement_timeout_s: float = Field(300.0, gt=0)
    """Longest wait for Ray to reserve every rank's bundle before the run fails naming the bundles."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of every weight (None = full fine-tuning). The reference model of objectives
    that need one is the base model (the adapter disabled), so no second copy is held."""
    seed: int = 0
    """Seeds Python, NumPy and torch in every rank before the model is built (defaults to the run's seed)."""

    @model_validator(mode="after")
    def _check_autocast(self) -> "LearnerConfig":
        if self.autocast_bf16 and self.dtype != "float32":
            raise ValueError("learner.autocast_bf16 keeps fp32 weights and runs the forward in bf16; with "
                             f"learner.dtype {self.dtype} the weights are bf16 already: set one of the two")
        return self
