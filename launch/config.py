"""The run's typed configuration: component configs composed, loaded from YAML, overridden from the CLI.

Each component owns its config class (ActorConfig, LearnerConfig, BufferConfig,
ObjectiveConfig); this module composes them, applies dotted overrides
(`--learner.lr 1e-5`) and checks the rules that span components. Every failure
is a `ConfigError` whose message names the key.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.config import ActorConfig
from actors.reward_config import RewardsConfig
from buffer.config import BufferConfig
from learner.config import LearnerConfig
from learner.objectives.config import READS
from launch.lora_sync import resolve_lora_sync
from launch.reward_check import check_rewards
from launch.offline_config import OfflineSourceConfig, check_offline
from launch.sources_config import SourceConfig, check_data, looks_local, with_source_rewards
from transport.registry import TRANSPORTS, pushes


class ConfigError(ValueError):
    """A configuration that cannot work; raised before any actor starts."""


UNION_MEMBER = re.compile(r"constrained-\w+|literal\[.*\]")  # pydantic's tags of a union member in an error's loc
TINY_MAX_MODEL_LEN = 64  # the default model's context: prompts of a+b= and a few answer tokens


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    """Local directory or hub name of a causal LM; None builds the tiny default model."""
    hidden_size: int = Field(128, ge=64, multiple_of=64)
    """Tiny default model: hidden size (head_dim is 64, so heads = hidden / 64)."""
    num_layers: int = Field(2, ge=1)
    """Tiny default model: transformer layers."""
    vocab_size: int = Field(64, ge=16)
    """Tiny default model: BPE vocabulary trained on the task text (byte-level; its alphabet, see
    tokenizer_alphabet, is always in it)."""
    tokenizer_alphabet: Literal["task", "ascii"] = "task"
    """Tiny default model: characters its tokenizer knows besides its chat template's: task (the arithmetic
    corpus's; any other character is dropped) or ascii (printable ASCII, for English chat prompts; a larger output
    layer, which the tiny model learns arithmetic worse with)."""
    max_model_len: int | None = Field(None, ge=8)
    """Context length (prompt + response) for generation and training. Unset: 64 for the tiny default model, and
    the model's own max_position_embeddings (its config.json) for `path`."""
    warm_start_steps: int = Field(200, ge=0)
    """Tiny default model: supervised steps on the answer format before RL."""
    warm_start_correct_fraction: float = Field(1.0, ge=0, le=1)
    """Fraction of warm-start answers that are right (the rest random); a short warm start leaves most of the table to RL."""
    seed: int = 0
    """Tiny default model: initialisation and warm-start seed (defaults to the run's seed)."""

    @model_validator(mode="after")
    def _tiny_model_context(self) -> "ModelConfig":
        # here, so a bare ModelConfig() builds the tiny model as before; a user model's is read in `validate`
        if self.path is None and self.max_model_len is None:
            self.max_model_len = TINY_MAX_MODEL_LEN
        return self


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: str = "synthetic:arithmetic"
    """Training prompts: synthetic:arithmetic; a .jsonl, .json or .parquet file; or any `datasets` source (a local
    directory or data file, a packaged builder such as json/parquet with data.load_kwargs, a hub name where online)."""
    sources: list[SourceConfig] = []
    """A mixture instead of data.train: sources with sampling weights and rewards (launch/sources_config.py)."""
    eval: str | None = None
    """Held-out prompts for greedy evaluation (same forms as data.train), or None."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every k learner steps (0 = off)."""
    split: str = "train"
    """`datasets` sources: the split data.train reads."""
    eval_split: str = "test"
    """`datasets` sources: the split data.eval reads."""
    load_kwargs: dict[str, Any] = {}
    """`datasets` sources: extra arguments of datasets.load_dataset (name, data_files, revision, ...)."""
    prompt_key: str = "prompt"
    """Field of a row holding its text prompt (a list of {role, content} there is read as a chat). Dotted names
    reach into nested fields (e.g. reward_model.ground_truth)."""
    messages_key: str = "messages"
    """Field holding a chat prompt (a list of {role, content}); used when a row has it, else data.prompt_key."""
    answer_key: str = "answer"
    """Field holding the reference answer the reward compares against."""
    id_key: str = "id"
    """Field holding the row's id (default: <file stem>-<row number>)."""
    source_key: str = "data_source"
    """Field naming the row's source: routes its reward (actors.reward as a mapping) and tags its rollouts."""
    require_answer: bool = True
    """Skip rows without an answer (counted as missing_answer); false for rewards that need no reference."""
    apply_chat_template: bool | Literal["auto"] = "auto"
    """Text prompts through the tokenizer's chat template (auto: when the tokenizer has one). Chat prompts
    (messages) always are; they need a tokenizer with a template."""
    system_prompt: str | None = None
    """A system turn put before every prompt that does not start with one (needs the chat template)."""
    max_prompt_len: int | None = Field(None, ge=1)
    """Skip rows whose rendered prompt is longer, in tokens (counted as prompt_too_long). Rows longer than
    model.max_model_len - actors.max_tokens are skipped the same way in any case."""
    max_operand: int = Field(9, ge=1)
    """synthetic:arithmetic: operands range over 0..max_operand."""
    seed: int = 0
    """Prompt order seed (defaults to the run's seed)."""
    offline: list[OfflineSourceConfig] = []
    """Offline sources (prompt, response, reward rows; see launch/offline_config.py) mixed into learner batches."""
    offline_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """Share of each learner batch, in groups, drawn from data.offline; 1.0 = a purely offline run (no rollout
    actor, no vLLM engine)."""


class WeightSyncConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transport: Literal["object_store", "shared_memory", "disk", "nccl", "relay_cpu"] = "object_store"
    """How weights travel learner -> generators: pulled (object_store; shared_memory, the fastest on one CPU host:
    the learner writes each version into /dev/shm in vLLM's own layout and generators serve from it without a copy;
    disk) or pushed through vLLM's weight-transfer
    engine: nccl on GPU clusters, relay_cpu (the same calls, buckets through /dev/shm) on one CPU host."""
    timeout_s: float = Field(120.0, gt=0)
    """A fetch, or any call of a weight push, that takes longer fails naming the version and the generator."""
    bucket_mb: float = Field(256.0, gt=0)
    """nccl: weights are broadcast packed into buckets of about this size (a larger tensor travels alone)."""


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = None
    """None starts a local Ray; 'auto' or host:port joins a cluster (ray job submit sets it)."""
    num_cpus: int | None = Field(None, ge=1)
    """Local Ray only: CPUs to offer (default: the machine's)."""
    dashboard_host: str = "127.0.0.1"
    """Local Ray only: where the dashboard listens; loopback unless said otherwise."""
    include_dashboard: bool = False
    """Local Ray only: start the dashboard."""
    rpc_timeout_s: float = Field(600.0, gt=0)
    """Longest wait on any actor call (a generation request, a learner step, a put) before it counts as failed."""
    connect_timeout_s: float = Field(30.0, gt=0)
    """Joining a cluster: longest wait for its GCS to accept a connection before the run fails naming the address."""
    startup_timeout_s: float = Field(900.0, gt=0)
    """Longest wait for the learner ranks to load the model and start DeepSpeed."""


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "arith"
    """Run name; the run directory is output_dir/name-<timestamp>."""
    output_dir: str = "runs"
    """Where run directories are created."""
    seed: int = 0
    """Global seed: seeds the launcher process, and is the `seed` of model, data, actors, buffer and learner
    wherever one of those is not set explicitly."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    actors: ActorConfig = ActorConfig()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    weights: WeightSyncConfig = WeightSyncConfig()
    rewards: RewardsConfig = RewardsConfig()
    """Learned judges (reward and preference models) that a reward spec `model:<name>` scores with."""
    ray: RayConfig = RayConfig()
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    progress: bool = True
    """Show a progress bar."""
    wandb: bool = False
    """Also log every metric to Weights & Biases, offline, under the run directory (needs the `wandb` extra)."""
    log_samples_every: int = Field(10, ge=0)
    """Every k learner steps, write a few decoded rollouts (prompt as the model saw it, response, reward, answer,
    source, policy version) to samples.jsonl and TensorBoard (0 = off)."""
    log_samples: int = Field(4, ge=1)
    """Rows written each time (the most recent ones generated)."""

    @model_validator(mode="after")
    def _component_defaults_from_the_run(self) -> "RunConfig":
        # Here rather than in `validate`, so every RunConfig (YAML, overrides, a resumed config.yaml, a test's
        # RunConfig(seed=7)) resolves the same way; copies, so a shared default instance is never changed.
        # A resumed run reads its resolved seeds back from config.yaml, so it keeps the seeds it started with.
        for name in ("model", "data", "actors", "buffer", "learner"):
            component = getattr(self, name)
            if "seed" not in component.model_fields_set:
                setattr(self, name, component.model_copy(update={"seed": self.seed}))
        # token_sum divides by B * max_len: the longest answer the generators can produce, so the constant never
        # depends on this batch's longest response or on the micro-batch split (Dr.GRPO; TRL's max_completion_length).
        if any(s.behaviour == "reference" for s in self.data.offline) and "behaviour_fill" not in \
                self.learner.model_fields_set:  # the learner computes those rows' behaviour log-probs
            self.learner = self.learner.model_copy(update={"behaviour_fill": "reference"})
        # every source's reward is a route of actors.reward, so the rollout actors score each row by its source
        reward = with_source_rewards(self.actors.reward, "reward" in self.actors.model_fields_set, self.data.sources)
        if reward != self.actors.reward:
            self.actors = self.actors.model_copy(update={"reward": reward})
        objective = self.learner.objective
        if "max_len" not in objective.model_fields_set and "max_len" in READS[objective.name]:
            objective = objective.model_copy(update={"max_len": self.actors.max_tokens})
            self.learner = self.learner.model_copy(update={"objective": objective})
        return self


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--a.b value` and `--a.b=value` pairs; values are parsed as YAML scalars (1e-5, true, [1, 2])."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --learner.lr 1e-5")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"config key {key!r}: missing value")
            value, i = args[i + 1], i + 1
        out[key] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    if not first["loc"] and "error" in first.get("ctx", {}):  # RunConfig's own validator: its message names the keys
        return str(first["ctx"]["error"])
    # a union's members appear in the location (learner.publish_every.constrained-int): the key is without them
    key = ".".join(str(p) for p in first["loc"] if not UNION_MEMBER.fullmatch(str(p)))
    if first["type"] == "extra_forbidden":
        return f"unknown config key {key!r}"
    return f"config key {key!r}: {first['msg']} (got {first.get('input')!r})"


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Rules that span components: each one would otherwise deadlock or fail late."""
    L, A, B = cfg.learner, cfg.actors, cfg.buffer
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("config key 'wandb': true, but the wandb package is not installed "
                          "(pip install 'relay-rl[wandb]', or set wandb false)")
    if cfg.model.path is not None and looks_local(cfg.model.path) and not Path(cfg.model.path).expanduser().exists():
        raise ConfigError(f"config key 'model.path': {cfg.model.path} does not exist")
    if problem := check_data(cfg.data):  # prompt files exist; data.sources' rules
        raise ConfigError(problem)
    _check_transport(cfg)
    if problem := resolve_lora_sync(cfg):  # learner.lora.sync auto: adapter where adapters can travel
        raise ConfigError(problem)
    if A.top_p < 1.0 or A.top_k > 0:
        key = "actors.top_p" if A.top_p < 1.0 else "actors.top_k"
        raise ConfigError(f"config key {key!r}: the learner's log-probs are of the whole softmax at actors.temperature, "
                          "while vLLM records them under the truncated distribution it samples from, so every "
                          "importance ratio would be biased; sample with top_p 1.0 and top_k 0")
    if problem := check_rewards(cfg):  # reward specs (user code loads here, in the driver) and their judges
        raise ConfigError(problem)
    _check_engine(cfg)  # resolves model.max_model_len
    D = cfg.data
    if D.max_prompt_len is not None and D.max_prompt_len + A.max_tokens > cfg.model.max_model_len:
        raise ConfigError(f"config key 'data.max_prompt_len': {D.max_prompt_len} + actors.max_tokens={A.max_tokens} "
                          f"exceeds model.max_model_len={cfg.model.max_model_len}")
    if problem := check_offline(D, L, pushes(cfg.weights.transport)):
        raise ConfigError(problem)
    if D.eval_every and not (D.eval or any(s.eval for s in D.sources)):
        raise ConfigError("config key 'data.eval_every': set data.eval (or data.sources[i].eval) to held-out prompts")
    if (max_len := L.objective.max_len) is not None and max_len < A.max_tokens:
        raise ConfigError(f"config key 'learner.objective.max_len': {max_len} is shorter than actors.max_tokens="
                          f"{A.max_tokens}; token_sum's constant B * max_len must cover the longest response")
    if L.groups_per_step % L.num_ranks:
        raise ConfigError(f"config key 'learner.groups_per_step': {L.groups_per_step} is not divisible by learner.num_ranks={L.num_ranks}")
    per_rank = L.groups_per_step // L.num_ranks
    if per_rank % min(L.micro_batch_groups, per_rank):
        raise ConfigError(f"config key 'learner.micro_batch_groups': {L.micro_batch_groups} does not divide the {per_rank} groups each rank trains per step")
    # the oldest weights a step can face: those of the last publish, or the starting ones when none comes in time
    period = L.total_steps if L.publish_every == "never" else min(L.publish_every, L.total_steps)
    if B.staleness_policy == "admission" and period - 1 > B.max_staleness:
        which = f"learner.publish_every - 1 = {period - 1}" if period != L.total_steps or L.publish_every == \
            L.total_steps else f"learner.total_steps - 1 = {period - 1} (learner.publish_every {L.publish_every})"
        raise ConfigError(f"config key 'buffer.max_staleness': {B.max_staleness} < {which}: no rollout could ever be "
                          "fresh enough")
    if B.filter == "zero_variance" and A.n < 2:
        raise ConfigError(f"config key 'buffer.filter': zero_variance drops groups whose rewards are all equal, and "
                          f"with actors.n={A.n} every group is: set actors.n >= 2 or buffer.filter none")
    window = (B.max_staleness + 1) * L.groups_per_step
    if A.prompts_per_request > window:
        raise ConfigError(f"config key 'actors.prompts_per_request': {A.prompts_per_request} exceeds the {window} groups the staleness bound admits at once")
    if B.capacity_groups < L.groups_per_step or B.min_size_groups > B.capacity_groups:
        raise ConfigError(f"config key 'buffer.capacity_groups': {B.capacity_groups} cannot hold one step of {L.groups_per_step} groups")


def _check_transport(cfg: RunConfig) -> None:
    """Weight transports against where generators and the learner run, and how generators take new weights."""
    A, L = cfg.actors, cfg.learner
    if A.weight_update_mode == "in_flight" and pushes(cfg.weights.transport):
        pull = ", ".join(n for n in TRANSPORTS if not pushes(n))
        raise ConfigError(f"config key 'actors.weight_update_mode': in_flight works with weights.transport {pull}, "
                          f"not {cfg.weights.transport!r} (a push transport is not wired to pause/resume)")
    if cfg.weights.transport == "shared_memory" and A.num_gpus > 0:
        raise ConfigError("config key 'weights.transport': shared_memory serves generators on CPU; with "
                          "actors.num_gpus > 0 use nccl (or object_store)")
    if cfg.weights.transport == "shared_memory" and A.cpu_weight_layout != "plain":
        raise ConfigError("config key 'weights.transport': shared_memory serves vLLM's plain CPU weight layout; "
                          f"actors.cpu_weight_layout is {A.cpu_weight_layout!r}")
    if cfg.weights.transport == "nccl" and (A.num_gpus <= 0 or L.num_gpus <= 0):
        raise ConfigError("config key 'weights.transport': nccl broadcasts from the learner's GPU to the generators' "
                          f"GPUs, but actors.num_gpus={A.num_gpus} and learner.num_gpus={L.num_gpus}: give both GPUs, "
                          "or use object_store / shared_memory on CPU")


def _check_engine(cfg: RunConfig) -> None:
    """The engine settings: tensor parallelism where it can run, and a context that holds a prompt and a response.
    A user model's context length is resolved here from its config (the driver can read it: a local directory
    or the hub cache), so every actor is started with the same number."""
    A = cfg.actors
    if A.tensor_parallel_size > 1 and A.num_gpus <= 0:
        raise ConfigError(f"config key 'actors.tensor_parallel_size': {A.tensor_parallel_size} needs GPUs (Relay runs "
                          "vLLM tensor parallelism on GPUs only), but actors.num_gpus is 0: use 1 on CPU, and more "
                          "actors.num_actors for more throughput")
    if A.tensor_parallel_size > 1 and A.num_gpus != 1:
        raise ConfigError(f"config key 'actors.num_gpus': {A.num_gpus} with actors.tensor_parallel_size "
                          f"{A.tensor_parallel_size}: each tensor-parallel worker holds one whole GPU, so each actor "
                          f"reserves {A.tensor_parallel_size} GPUs; set actors.num_gpus 1")
    if cfg.model.path is not None:
        check_model(cfg, cfg.model.path)
    if A.max_tokens >= cfg.model.max_model_len:
        raise ConfigError(f"config key 'actors.max_tokens': {A.max_tokens} leaves no room for a prompt in "
                          f"model.max_model_len={cfg.model.max_model_len} (prompt + response); lower it or raise "
                          "model.max_model_len")


def model_limits(path: str, required: bool = True) -> dict | None:
    """max_position_embeddings, vocab_size and rope_scaling of the model at `path` (a directory or a hub name).
    Not `required`: only from a local directory or the hub cache, None where neither has it."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=not required)
    except Exception as exc:  # no config.json, offline without a cached copy, an unknown architecture
        if not required:
            return None
        raise ConfigError(f"config key 'model.path': cannot read the model config of {path} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "set model.max_model_len to skip reading the context length") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    return {"max_position_embeddings": getattr(text, "max_position_embeddings", None),
            "vocab_size": getattr(text, "vocab_size", None),
            # plain rope (transformers 5 reports it as rope_type "default") stretches nothing
            "rope_scaling": rope.get("rope_type", rope.get("type", "default")) not in ("default", None)}


def check_model(cfg: RunConfig, model_path: str) -> None:
    """What only the model's config can tell: the context length (resolved when unset; an explicit one longer than
    the model's is refused unless rope scaling stretches it, which vLLM judges) and stop ids inside the vocabulary.
    The launcher calls it once the default model is built. With both set, a model not at hand yet (a hub name
    the driver has not downloaded) is not fetched: vLLM checks the length when it loads it."""
    M, A = cfg.model, cfg.actors
    limits = model_limits(model_path, required=M.max_model_len is None or bool(A.stop_token_ids))
    if limits is None:
        return
    longest = limits["max_position_embeddings"]
    if M.max_model_len is None:
        if longest is None:
            raise ConfigError(f"config key 'model.max_model_len': {model_path} names no max_position_embeddings; set it")
        cfg.model = M.model_copy(update={"max_model_len": longest})
    elif longest is not None and M.max_model_len > longest and not limits["rope_scaling"]:
        raise ConfigError(f"config key 'model.max_model_len': {M.max_model_len} exceeds the {longest} positions of "
                          f"{model_path} (max_position_embeddings)")
    vocab = limits["vocab_size"]
    bad = [t for t in A.stop_token_ids if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise ConfigError(f"config key 'actors.stop_token_ids': {bad} outside the vocabulary of {model_path} "
                          f"(vocab_size {vocab})")
