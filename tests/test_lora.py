"""LoRA on the learner (issue 20, learner side): PEFT adapters on the DeepSpeed engine, merged weights for the
generators (learner.lora.sync merged; adapter sync: tests/test_lora_sync.py), exact resume, and final/ in both
formats. DeepSpeed under ZeRO 0, 2 and 3 on a micro model
(ZeRO-3 with every parameter partitioned, the frozen head included)."""
from __future__ import annotations

import pytest
import torch

from learner.batch import to_tensors
from tests.test_learner_microbatch import config_for, ragged_batch

LORA = {"rank": 4, "alpha": 8.0}


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory) -> str:
    from tests.micro_model import build_micro_model

    return build_micro_model(tmp_path_factory.mktemp("micro"))


def lora_learner(model_dir: str, **kw):
    from learner.config import LearnerConfig
    from learner.learner import Learner

    kw.setdefault("objective", config_for("grpo"))
    kw.setdefault("lora", LORA)
    return Learner(LearnerConfig(groups_per_step=4, lr=1e-2, **kw), model_dir, group_size=3, temperature=0.7)


def adapters(learner) -> dict[str, torch.Tensor]:
    return learner.adapter_state()


def test_lora_config_refuses_bad_values():
    from pydantic import ValidationError

    from learner.config import LearnerConfig

    assert LearnerConfig().lora is None  # full fine-tuning by default
    assert LearnerConfig(lora={"target_modules": "all-linear"}).lora.target_modules == "all-linear"
    for bad in ({"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": []}, {"r": 8}):
        with pytest.raises(ValidationError, match="lora"):
            LearnerConfig(lora=bad)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_only_adapters_train_and_full_state_is_the_peft_merge(micro_model_dir, dist_env, stage):
    """Base weights frozen and untouched by a step; DeepSpeed's optimizer holds the adapters only; full_state has
    exactly the base model's keys and equals PEFT's merge_and_unload of the same adapter within 1e-6."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    learner = lora_learner(micro_model_dir, zero_stage=stage, zero3_persistence_threshold=0 if stage == 3 else None)
    module = learner.engine.module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n_adapter = sum(getattr(p, "ds_numel", p.numel()) for n, p in module.named_parameters() if n in trainable)
    opt = learner.engine.optimizer
    if stage == 3:  # the fp32 master partitions the optimizer steps (its param_groups list no module parameters)
        opt_numel = sum(t.numel() for t in opt.fp32_partitioned_groups_flat)
    else:  # ZeRO-2 hands the optimizer flat fp32 copies of the trainable parameters (one rank: all of them)
        opt_numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert opt_numel == n_adapter, (opt_numel, n_adapter)

    base = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32)
    want_keys = {n for n, _ in base.named_parameters(remove_duplicate=False)}
    before = learner.full_state()
    assert set(before) == want_keys
    for k, v in base.state_dict().items():  # B starts at zero: the merge is the base model itself
        torch.testing.assert_close(before[k], v, atol=0, rtol=0)

    for _ in range(2):
        learner.train_step(ragged_batch())
    after, adapter = learner.full_state(), adapters(learner)
    assert set(after) == want_keys
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapter trained
    changed = {k for k in want_keys if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith("_proj.weight") for k in changed), changed  # only targeted weights moved

    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8.0, target_modules=learner.cfg.lora.target_modules,
                                                 task_type="CAUSAL_LM"))
    result = peft_model.load_state_dict(adapter, strict=False)  # the learner's PEFT names, adapter included
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    merged = peft_model.merge_and_unload().state_dict()
    for k in want_keys:
        torch.testing.assert_close(after[k], merged[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow
def test_zero3_trains_the_same_adapters_as_zero0(micro_model_dir, dist_env):
    """ZeRO-3 with a partitioned frozen head (learner/batch.py _gathered_copy) against ZeRO-0: same losses, same
    adapters after two steps."""
    runs = {}
    for stage in (0, 3):
        learner = lora_learner(micro_model_dir, zero_stage=stage, zero3_persistence_threshold=0 if stage == 3 else None)
        losses = [learner.train_step(ragged_batch())["loss"] for _ in range(2)]
        runs[stage] = losses, adapters(learner)
    assert runs[3][0] == pytest.approx(runs[0][0], abs=1e-6)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[3][1][k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_adapters(micro_model_dir, dist_env):
    """PEFT adapters under transformers' (non-reentrant) gradient checkpointing: the frozen embeddings' output
    needs no grad for the adapters inside each layer to get theirs."""
    runs = []
    for checkpointing in (False, True):
        learner = lora_learner(micro_model_dir, gradient_checkpointing=checkpointing)
        losses = [learner.train_step(ragged_batch())["loss"] for _ in range(2)]
        runs.append((losses, adapters(learner)))
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-6)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_lora_checkpoint_resumes_exactly(micro_model_dir, dist_env, tmp_path, stage):
    """Train, save, a new learner loads: identical adapter tensors and an identical next step (loss and adapters)."""
    z3 = {"zero3_persistence_threshold": 0} if stage == 3 else {}
    first = lora_learner(micro_model_dir, zero_stage=stage, **z3)
    for _ in range(2):
        first.train_step(ragged_batch())
    first.save_checkpoint(str(tmp_path / "ckpt"))
    saved = adapters(first)

    second = lora_learner(micro_model_dir, zero_stage=stage, seed=1, **z3)  # a different random A before the load
    assert any(not torch.equal(saved[k], v) for k, v in adapters(second).items())
    assert second.load_checkpoint(str(tmp_path / "ckpt")) == 2
    for k, v in adapters(second).items():
        assert torch.equal(v, saved[k]), k
    loss_a = first.train_step(ragged_batch())["loss"]
    loss_b = second.train_step(ragged_batch())["loss"]
    assert loss_a == loss_b
    a, b = adapters(first), adapters(second)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the optimizer state came back too
    assert first.full_state().keys() == second.full_state().keys()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_reference_is_the_base_model_with_the_adapter_disabled(micro_model_dir, dist_env, stage):
    from transformers import AutoModelForCausalLM

    learner = lora_learner(micro_model_dir, objective=config_for("kl_pg"), track_ref_kl=True, zero_stage=stage,
                           zero3_persistence_threshold=0 if stage == 3 else None)
    assert learner.ref is None and learner.ref_is_base  # no second copy of the model
    for _ in range(2):
        learner.train_step(ragged_batch())
    full = to_tensors(ragged_batch(), pad_id=0)
    plan = learner._plan(full)
    plain = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(learner._reference_logp(full, plan), learner._frozen_logp(plain, full, plan),
                               atol=1e-6, rtol=0)
    policy = learner._frozen_logp(learner.engine.module, full, plan)
    assert float((policy - learner._reference_logp(full, plan)).abs().max()) > 1e-4  # the adapter is back on


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_final_holds_merged_weights_and_the_peft_adapter(micro_model_dir, dist_env, tmp_path, stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = lora_learner(micro_model_dir, zero_stage=stage, zero3_persistence_threshold=0 if stage == 3 else None)
    for _ in range(2):
        learner.train_step(ragged_batch())
    adapter_only = tmp_path / "adapter-only"  # final/ without --merge: the adapter (and the tokenizer) alone
    learner.save_pretrained(str(adapter_only), merge=False)
    assert (adapter_only / "adapter" / "adapter_model.safetensors").exists() and (adapter_only / "tokenizer.json").exists()
    assert not list(adapter_only.glob("*.safetensors")) and not (adapter_only / "config.json").exists()
    out = learner.save_pretrained(str(tmp_path / "final"), merge=True)  # --merge (learner.lora.merge_final)
    final = tmp_path / "final"
    assert out == str(final) and (final / "model.safetensors").exists()
    assert (final / "adapter" / "adapter_config.json").exists()
    assert (final / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, final / "adapter").eval()
    ids = to_tensors(ragged_batch(), pad_id=0).input_ids
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
        with with_adapter.disable_adapter():
            plain = with_adapter(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert float((a - plain).abs().max()) > 1e-4  # the trained adapter is in both
