"""GPU check: everything of Relay's GPU path that one GPU without vLLM or Ray can hold, in one summary table.

The machines lent for GPU checks have torch, transformers, accelerate and peft but no vLLM or Ray (DeepSpeed and
pydantic travel along as wheels; see the README's benchmarks section), so this script imports nothing of ray,
vllm or pyarrow, directly or through Relay's modules (the `import_graph` row says whether that held). Rows:

  fused_adam       DeepSpeed's FusedAdam op builds (it needs nvcc); if not, the learner rows use torch's AdamW
  learner_zero0/2  two DeepSpeed learner steps through `learner.learner.Learner` (bf16 on a GPU): loss finite,
                   weights changed, ZeRO 0 and 2 agree on the first loss
  objectives       every registered objective on the device (float32) against CPU float64: loss and gradient
  logprobs_fp32/bf16  the learner's response log-probs against a plain transformers forward + log_softmax
  process_group    a one-rank torch.distributed group (NCCL on a GPU, gloo on CPU): all_reduce, broadcast, destroy
  save_pretrained  Learner.save_pretrained (safetensors), reloaded with transformers: equal parameters and logits
  throughput       tokens/s and MFU of one learner step on a Qwen3-0.6B-shaped model (benchmarks/learner_memory)
  import_graph     no ray, vllm or pyarrow in sys.modules after all of the above

    python -m benchmarks.gpu_check                      # on a GPU: ~3-5 min on an H200 (not yet run on one)
    python -m benchmarks.gpu_check --tiny               # CPU, tiny models, < 1 min (tests/test_gpu_check.py)
    python -m benchmarks.gpu_check --json out.json      # the rows as JSON too

Exits non-zero when a row FAILs. Models are random-weight, built from their configs (no download).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from benchmarks.common import CACHE
from benchmarks.learner_memory import H100_BF16_DENSE, build_model, make_batch

HEAVY = ("ray", "vllm", "pyarrow")  # what the device machine lacks (pyarrow: the buffer's, never the learner's)


@dataclass
class Row:
    name: str
    result: str  # "ok", "FAIL: why" or "skipped: why"
    value: float | None = None
    unit: str = ""
    note: str = ""


@dataclass
class Plan:
    """What one run checks on: the device, the model for the learner rows and the throughput row's size."""

    device: str
    dtype: str  # the learner's precision: bf16, as on a GPU cluster (DeepSpeed's CPU accelerator takes it too)
    model: str  # for the learner, log-prob and save rows: a benchmarks.learner_memory shape, or "tiny"
    speed_model: str
    speed_rows: int
    speed_length: int
    peak_flops: float


def plan_for(args) -> Plan:
    if args.device == "cuda":
        return Plan("cuda", "bfloat16", "bench", "qwen3-0.6b", 8, 1024, args.peak_flops)
    # CPU: a model of a few thousand parameters for the learner rows (DeepSpeed's ZeRO-2 step on CPU takes seconds
    # per 10M parameters), the learner benchmark's smallest shape (Qwen's vocabulary, 2 small layers) for speed
    return Plan("cpu", "bfloat16", "tiny", "quick", 2, 32, args.peak_flops)


def build_tiny_model(cache=CACHE) -> str:
    """A random Qwen2 of vocabulary 512, hidden 32, 2 layers, tied embeddings (as Qwen's small models), built once."""
    out = cache / "gpu-check-tiny"
    if (out / "config.json").exists():
        return str(out)
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    config = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp, safe_serialization=True)
    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 64)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<eos>")),
                            pad_token="<pad>", eos_token="<eos>").save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_env() -> None:
    """The rank variables DeepSpeed's init_distributed reads; one rank on a free local port."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    """Drop the previous row's engines before the next allocates its own."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- DeepSpeed's optimizer op ------------------------------------------------------------------
def check_fused_adam(plan: Plan) -> Row:
    """On a GPU DeepSpeed's "AdamW" is FusedAdam, JIT-compiled with nvcc on first use; pip's torch ships no nvcc.
    When it cannot build, the learner rows run with torch's AdamW (`torch_adam`), so the rest still runs, and
    this row says a real run needs nvcc (or DeepSpeed installed with DS_BUILD_FUSED_ADAM=1)."""
    t0 = time.perf_counter()
    try:
        from deepspeed.accelerator import get_accelerator

        get_accelerator().create_op_builder("FusedAdamBuilder").load()  # the builder of this device's accelerator
    except Exception as e:  # noqa: BLE001  MissingCUDAException, a compiler error: all mean "not here"
        use_torch_adam()
        return Row("fused_adam", f"skipped: FusedAdam cannot build ({last_line(e)}); learner rows use torch AdamW")
    return Row("fused_adam", "ok", round(time.perf_counter() - t0, 1), "s to load/build")


def use_torch_adam() -> None:
    """Make the Learner's DeepSpeed config ask for torch's AdamW (the product's config is left as it is)."""
    import learner.learner as ll

    if getattr(ll.deepspeed_config, "torch_adam", False):
        return
    original = ll.deepspeed_config

    def with_torch_adam(cfg, rows_per_micro):
        ds = original(cfg, rows_per_micro)
        ds["optimizer"]["params"]["torch_adam"] = True
        return ds

    with_torch_adam.torch_adam = True
    ll.deepspeed_config = with_torch_adam


# ---- the learner -------------------------------------------------------------------------------
def make_learner(plan: Plan, model_dir: str, zero: int, dtype: str, lr: float = 1e-3, temperature: float = 1.0):
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from learner.objectives import ObjectiveConfig

    single_rank_env()
    # lr 1e-3: an Adam step of ~lr moves bf16 weights of ~0.02 by more than their rounding step (~1e-4)
    cfg = LearnerConfig(groups_per_step=1, micro_batch_groups=1, num_gpus=1 if plan.device == "cuda" else 0,
                        zero_stage=zero, dtype=dtype, lr=lr, logprob_chunk_tokens=64,
                        objective=ObjectiveConfig(name="grpo"))
    return Learner(cfg, model_dir, group_size=4, temperature=temperature)


def learner_batch(length: int, vocab: int):
    """One group of 4 rows, responses of length, length/2, length/4, length/4 after a 16-token prompt."""
    batch = make_batch(4, length, 16)
    batch.input_ids %= vocab  # make_batch draws from Qwen's vocabulary; the tiny model's is smaller
    return batch


def vocab(learner) -> int:
    return learner.engine.module.config.vocab_size


def params_snapshot(module) -> list:
    return [p.detach().float().cpu().clone() for p in module.parameters()]


def relative_change(before: list, module) -> float:
    num = sum(float((p.detach().float().cpu() - b).pow(2).sum()) for b, p in zip(before, module.parameters()))
    den = sum(float(b.pow(2).sum()) for b in before)
    return math.sqrt(num / den)


def check_learner(plan: Plan, model_dir: str, zero: int, first_losses: dict) -> Row:
    """Two optimizer steps: both losses finite, the weights moved; ZeRO 0 and 2 start from the same weights and
    batch, so their first losses agree (a stage that mis-scales or skips its gradient shows on the second)."""
    learner = make_learner(plan, model_dir, zero, plan.dtype)
    batch = learner_batch(32 if plan.device == "cpu" else 512, vocab(learner))
    before = params_snapshot(learner.engine.module)
    t0 = time.perf_counter()
    losses = [learner.train_tensors(batch)["loss"] for _ in range(2)]
    sync(plan.device)
    secs = (time.perf_counter() - t0) / 2
    change = relative_change(before, learner.engine.module)
    del learner
    release(plan.device)
    first_losses[zero] = losses + [change]
    note = f"{plan.dtype}, losses {losses[0]:.5g} -> {losses[1]:.5g}, {secs:.2f} s/step"
    if not all(math.isfinite(x) for x in losses):
        return Row(f"learner_zero{zero}", "FAIL: a loss is not finite", change, "rel. weight change", note)
    if not change > 0:
        return Row(f"learner_zero{zero}", "FAIL: the weights did not change", change, "rel. weight change", note)
    if zero != 0 and 0 in first_losses:
        gap = abs(first_losses[0][0] - losses[0])
        # Reported, not judged: in bf16 ZeRO 0 goes through DeepSpeed's FP16_Optimizer, whose set-up takes one Adam
        # step on zero gradients, so its first real update is bias-corrected as step 2 (0.74x ZeRO 2's).
        note += (f"; first loss vs ZeRO 0: {gap:.2g} apart; second: {abs(first_losses[0][1] - losses[1]):.2g}, "
                 f"weight change ZeRO 0 {first_losses[0][2]:.3g}")
        if gap > 1e-3 * max(abs(losses[0]), 1e-3):
            return Row(f"learner_zero{zero}", "FAIL: first loss differs from ZeRO 0's", change, "rel. weight change",
                       note)
    return Row(f"learner_zero{zero}", "ok", float(f"{change:.3g}"), "rel. weight change", note)


# ---- objectives --------------------------------------------------------------------------------
def objective_configs() -> dict:
    """Every objective of the registry, at its defaults (dpo needs a beta); the config's names must be the same."""
    from typing import get_args

    from learner.objectives import REGISTRY, ObjectiveConfig
    from learner.objectives.config import ObjectiveName

    if set(get_args(ObjectiveName)) != set(REGISTRY):
        raise ValueError(f"ObjectiveConfig names {sorted(get_args(ObjectiveName))} != registry {sorted(REGISTRY)}")
    return {name: ObjectiveConfig(name=name, **({"beta": 0.1} if name == "dpo" else {})) for name in REGISTRY}


def objective_inputs(dtype, device: str):
    """Two groups of four rows, 12 tokens, ragged masks, log-probs near the behaviour policy's (ratios ~1)."""
    import torch

    from learner.objectives import LossInputs

    gen = torch.Generator().manual_seed(0)
    B, T = 8, 12
    lengths = torch.tensor([12, 9, 5, 1, 12, 7, 3, 10])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()  # (B, T)
    behaviour = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 * mask  # (B, T)
    logp = behaviour + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64) * mask  # (B, T)
    ref = behaviour + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64) * mask  # (B, T)
    prox = behaviour + 0.05 * torch.randn(B, T, generator=gen, dtype=torch.float64) * mask  # (B, T)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25], dtype=torch.float64)  # (B,)
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # (B,)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    leaf = to(logp).requires_grad_(True)
    return leaf, LossInputs(logp=leaf, behaviour_logp=to(behaviour), mask=to(mask), rewards=to(rewards),
                            group_ids=group_ids.to(device), ref_logp=to(ref), prox_logp=to(prox))


def check_objectives(plan: Plan) -> Row:
    """Each objective's loss and gradient in float32 on the device against float64 on CPU."""
    import torch

    from learner.objectives import compute_loss

    worst, bad = 0.0, []
    configs = objective_configs()
    for name, cfg in configs.items():
        got, want = [], []
        for dtype, device, out in ((torch.float32, plan.device, got), (torch.float64, "cpu", want)):
            leaf, inputs = objective_inputs(dtype, device)
            loss, _ = compute_loss(cfg, inputs)
            loss.backward()
            out += [loss.detach().double().cpu(), leaf.grad.double().cpu()]
        if not (torch.isfinite(got[0]) and torch.isfinite(got[1]).all()):
            bad.append(f"{name} not finite")
            continue
        scale = max(float(want[0].abs()), float(want[1].abs().max()), 1e-3)
        diff = max(float((got[0] - want[0]).abs()), float((got[1] - want[1]).abs().max())) / scale
        worst = max(worst, diff)
        if diff > 1e-4:  # float32 against float64: ~1e-7 expected; 1e-4 leaves room for reordered sums on a GPU
            bad.append(f"{name} {diff:.2g}")
    note = f"{len(configs)} objectives, float32 on {plan.device} vs float64 on CPU (loss and d loss / d logp)"
    return Row("objectives", "ok" if not bad else "FAIL: " + ", ".join(bad), float(f"{worst:.3g}"), "max rel. diff",
               note)


# ---- log-probs against transformers ------------------------------------------------------------
def reference_logprobs(model_dir: str, dtype: str, device: str, batch, temperature: float):
    """The plain path: the causal LM's full logits, / temperature, fp32 log_softmax, gathered at the responses."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32).to(device).eval()
    with torch.no_grad():
        ids = batch.input_ids.to(device)
        logits = model(input_ids=ids, attention_mask=batch.attention_mask.to(device)).logits  # (B, L, V)
        logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, L-1, V)
        tokens = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        resp = tokens.gather(1, batch.resp_index.to(device))  # (B, T)
    return resp.cpu() * batch.resp_mask


def check_logprobs(plan: Plan, model_dir: str, dtype: str) -> Row:
    """The learner's response log-probs (last hidden state, chunked fp32 head, temperature) against the plain path
    in the same precision. fp32 should agree to rounding; in bf16 the learner's head runs in fp32 where the plain
    path's bf16 head rounds its logits, so they differ by about a bf16 step of the logits (~1e-2)."""
    import torch

    name = f"logprobs_{'bf16' if dtype == 'bfloat16' else 'fp32'}"
    temperature = 0.7
    learner = make_learner(plan, model_dir, 0, dtype, temperature=temperature)
    batch = learner_batch(32 if plan.device == "cpu" else 256, vocab(learner))
    with torch.no_grad():
        logp, _ = learner._forward(learner.engine.module, batch)  # (B, T)
    logp = logp.float().cpu() * batch.resp_mask
    del learner
    release(plan.device)
    want = reference_logprobs(model_dir, dtype, plan.device, batch, temperature)
    diff = float((logp - want).abs().max())
    tol = 1e-3 if dtype == "float32" else 0.1
    tokens = batch.resp_mask.sum()
    note = f"max abs diff over {int(tokens)} tokens, T=0.7, tolerance {tol:g}; mean logp {float(want.sum() / tokens):.3f}"
    ok = math.isfinite(diff) and diff <= tol
    return Row(name, "ok" if ok else f"FAIL: max abs diff {diff:.3g} > {tol:g}", float(f"{diff:.3g}"), "nats", note)


# ---- a process group ---------------------------------------------------------------------------
def process_group_child(device: str) -> dict:
    """In a fresh process (the learner rows own this process's default group): init, all_reduce, broadcast,
    barrier, destroy."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    t0 = time.perf_counter()
    kw = {"device_id": torch.device("cuda", 0)} if device == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **kw)
    init_s = time.perf_counter() - t0
    x = torch.arange(1 << 20, dtype=torch.float32, device=device)  # 4 MiB
    dist.all_reduce(x)
    y = torch.full((1024,), 3.0, device=device)
    dist.broadcast(y, src=0)
    dist.barrier()
    sync(device)
    ok = bool(x[-1] == (1 << 20) - 1) and bool((y == 3.0).all())
    dist.destroy_process_group()
    return {"backend": backend, "init_s": round(init_s, 3), "ok": ok, "initialized_after": dist.is_initialized()}


def check_process_group(plan: Plan) -> Row:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", "process_group", "--device", plan.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return Row("process_group", f"FAIL: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    note = f"{got['backend']}, one rank: init, all_reduce, broadcast, barrier, destroy"
    if not got["ok"] or got["initialized_after"]:
        return Row("process_group", f"FAIL: {got}", got["init_s"], "s to init", note)
    return Row("process_group", "ok", got["init_s"], "s to init", note)


# ---- save_pretrained ---------------------------------------------------------------------------
def check_save_pretrained(plan: Plan, model_dir: str) -> Row:
    """After a step (so the saved weights are not the ones loaded), save and reload: the same parameters, bit for
    bit, and the same logits. Tied embeddings are saved once (Learner.save_pretrained drops lm_head.weight), which
    the reload must re-tie."""
    import torch
    from transformers import AutoModelForCausalLM

    learner = make_learner(plan, model_dir, 2, plan.dtype)
    batch = learner_batch(32, vocab(learner))
    learner.train_tensors(batch)
    ids, attn = batch.input_ids.to(learner.device), batch.attention_mask.to(learner.device)
    with tempfile.TemporaryDirectory() as tmp:
        out = learner.save_pretrained(os.path.join(tmp, "model"))
        module = learner.engine.module.eval()
        trained = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}
        with torch.no_grad():
            want = module(input_ids=ids, attention_mask=attn).logits.float().cpu()
        del learner, module
        release(plan.device)
        files = sorted(os.listdir(out))
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16 if plan.dtype == "bfloat16"
                                                        else torch.float32).to(plan.device).eval()
        with torch.no_grad():
            got = reloaded(input_ids=ids, attention_mask=attn).logits.float().cpu()
        loaded = {n: p.detach().cpu() for n, p in reloaded.named_parameters()}
    diff = float((got - want).abs().max())
    unequal = sorted(n for n in trained if n not in loaded or not torch.equal(trained[n], loaded[n]))
    listed = ", ".join(f for f in files if f.endswith((".safetensors", ".json")))
    note = f"{plan.dtype}, {len(trained)} tensors; files: {listed}"
    if not any(f.endswith(".safetensors") for f in files) or any(f.endswith((".bin", ".pt")) for f in files):
        return Row("save_pretrained", "FAIL: not (only) safetensors", diff, "max abs logit diff", note)
    if unequal or set(loaded) != set(trained):
        return Row("save_pretrained", f"FAIL: parameters differ: {(unequal or sorted(set(loaded) ^ set(trained)))[:3]}",
                   diff, "max abs logit diff", note)
    # Equal weights and inputs give equal logits on CPU; a GPU's kernels may pick another reduction order
    tol = 0.0 if plan.device == "cpu" else 1e-2 * max(float(want.abs().max()), 1.0)
    return Row("save_pretrained", "ok" if diff <= tol else f"FAIL: logits differ by {diff:.3g}", diff,
               "max abs logit diff", note)


# ---- throughput --------------------------------------------------------------------------------
def check_throughput(plan: Plan) -> Row:
    """One timed learner step after a warm-up (benchmarks/learner_memory's child, Relay's path)."""
    import torch

    from benchmarks.learner_memory import SHAPES, child

    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    args = SimpleNamespace(model=plan.speed_model, rows=plan.speed_rows, length=plan.speed_length, prompt_len=64,
                           path="relay", device=plan.device, dtype=plan.dtype, chunk_tokens=256, micro_tokens=None,
                           checkpointing=False, peak_flops=plan.peak_flops)
    got = child(args)
    release(plan.device)
    shape = dict(zip(("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim"), SHAPES[plan.speed_model]))
    note = (f"{plan.speed_model} ({got['params'] / 1e6:.0f}M params), {plan.speed_rows} rows <= {plan.speed_length}"
            f"+64 tokens, {plan.dtype}, step {got['step_s']} s, peak {got['peak_gib']} GiB")
    if plan.device == "cuda":
        note += f", MFU {got['mfu']:.3g} of {plan.peak_flops:.3g} FLOP/s"
    else:
        note += ", MFU n/a on CPU"
    note += f"; shape {shape}"
    ok = got["tokens_per_s"] > 0 and math.isfinite(got["tokens_per_s"])
    return Row("throughput", "ok" if ok else "FAIL: no tokens/s", got["tokens_per_s"], "tokens/s", note)


def check_import_graph() -> Row:
    # a None entry is a module blocked from importing (tests/test_gpu_check.py), not one imported
    heavy = sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None} & set(HEAVY))
    return Row("import_graph", "ok" if not heavy else f"FAIL: imported {', '.join(heavy)}", len(heavy),
               "heavy modules", f"none of {', '.join(HEAVY)} in sys.modules")


# ---- the run -----------------------------------------------------------------------------------
def last_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]


def guarded(name: str, fn, *args) -> Row:
    """A check that raises is a FAIL row with the exception's message; the remaining rows still run."""
    t0 = time.perf_counter()
    try:
        row = fn(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        row = Row(name, f"FAIL: {type(e).__name__}: {last_line(e)}")
    print(f"[gpu_check] {row.name}: {row.result} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return row


def missing_modules() -> list[str]:
    import importlib.util

    return [m for m in ("torch", "transformers", "deepspeed", "pydantic", "safetensors", "tokenizers")
            if importlib.util.find_spec(m) is None]


def run_checks(plan: Plan) -> list[Row]:
    missing = missing_modules()
    if missing:  # the table still lists every row, each saying why it could not run
        why = f"FAIL: not installed: {', '.join(missing)} (see the README: wheels to carry)"
        return [Row(n, why) for n in ("fused_adam", "learner_zero0", "learner_zero2", "objectives", "logprobs_fp32",
                                      "logprobs_bf16", "process_group", "save_pretrained", "throughput")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = build_tiny_model() if plan.model == "tiny" else build_model(plan.model)
    rows = [guarded("fused_adam", check_fused_adam, plan)]
    first_losses: dict[int, list[float]] = {}
    rows += [guarded(f"learner_zero{z}", check_learner, plan, model_dir, z, first_losses) for z in (0, 2)]
    rows.append(guarded("objectives", check_objectives, plan))
    rows += [guarded(f"logprobs_{n}", check_logprobs, plan, model_dir, d)
             for n, d in (("fp32", "float32"), ("bf16", "bfloat16"))]
    rows.append(guarded("process_group", check_process_group, plan))
    rows.append(guarded("save_pretrained", check_save_pretrained, plan, model_dir))
    rows.append(guarded("throughput", check_throughput, plan))
    return rows


def environment(plan: Plan) -> dict:
    from benchmarks.common import git_commit, versions

    import torch

    env = {"device": plan.device, "commit": git_commit(), **versions(), "cuda": torch.version.cuda}
    if plan.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def table(rows: list[Row]) -> str:
    cells = [("check", "result", "value", "unit", "note")] + [
        (r.name, r.result, "" if r.value is None else f"{r.value:.4g}", r.unit, r.note) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models, well under a minute")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available (cpu with --tiny)")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE, help="for MFU (default H100/H200 bf16)")
    parser.add_argument("--json", metavar="OUT", help="also write the rows and the environment as JSON")
    parser.add_argument("--child", choices=("process_group",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(process_group_child(args.device)))
        return 0
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    plan = plan_for(args)
    t0 = time.perf_counter()
    rows = run_checks(plan)
    rows.append(check_import_graph())
    total = time.perf_counter() - t0
    print(table(rows))
    failed = [r.name for r in rows if r.result.startswith("FAIL")]
    print(f"{len(rows)} checks on {plan.device} in {total:.0f} s: "
          f"{'all ok or skipped' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if args.json:
        doc = {"environment": environment(plan), "plan": asdict(plan), "total_s": round(total, 1),
               "rows": [asdict(r) for r in rows]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
