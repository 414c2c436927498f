"""Token-budget micro-batches: the step's gradient does not depend on how its rows are split.

The objective-level check runs every registered objective on its own (no model); the learner-level checks run
DeepSpeed under ZeRO 0 and 2 on a micro model, comparing one micro-batch with a group-count split of unequal
sizes and with a token budget."""
from __future__ import annotations

import pytest
import torch

from buffer.schema import rollouts_to_arrow
from buffer.testing import fake_group
from learner.batch import micro_batches, to_tensors
from learner.objectives import REGISTRY, LossInputs, ObjectiveConfig, compute_loss, needs_whole_groups, step_context
from learner.objectives.config import READS

LENGTHS = {"a": (3, 5), "b": (7, 2), "c": (4, 9), "d": (2, 6)}  # group: (prompt, response) of its first row
REWARDS = [1.0, 0.0, 0.5]


def ragged_batch(groups: str = "abcd", vocab: int = 40):
    """Groups of 3 rows whose responses differ in length inside each group too; rewards not all tied."""
    rows = []
    for gid in groups:
        prompt_len, response_len = LENGTHS[gid]
        for k, r in enumerate(fake_group(gid, group_size=3, prompt_len=prompt_len, response_len=response_len,
                                         rewards=REWARDS if gid != "d" else [0.0, 0.0, 0.0])):
            n = response_len - k  # rows of one group end at different lengths
            r.token_ids = [2 + (3 * t + 5 * k + ord(gid)) % (vocab - 2) for t in range(prompt_len + n)]
            r.behaviour_logprobs = [-0.5 - 0.1 * t for t in range(n)]
            r.token_versions = [0] * n
            rows.append(r)
    return rollouts_to_arrow(rows)


def config_for(name: str) -> ObjectiveConfig:
    knobs = {"beta": 0.1} if "beta" in READS[name] else {}
    return ObjectiveConfig(name=name, **knobs, **({"max_len": 12} if "max_len" in READS[name] else {}))


def test_micro_batches_pack_rows_by_tokens_and_cut_padding():
    full = to_tensors(ragged_batch(), pad_id=0)
    lengths = full.attention_mask.sum(1)
    for budget in (10, 25, 60):
        for whole in (False, True):
            plan = micro_batches(full, 1, budget, whole)
            assert sorted(torch.cat(plan).tolist()) == list(range(len(full)))  # every row exactly once
            for rows in plan:
                cost = len(rows) * int(lengths[rows].max())
                assert cost <= budget or (len(rows) == 1 and not whole) or len(torch.unique(full.group_ids[rows])) == 1
                if whole:  # a group is never split
                    for g in torch.unique(full.group_ids[rows]):
                        assert int((full.group_ids[rows] == g).sum()) == int((full.group_ids == g).sum())
                mb = full.take(rows)
                assert mb.input_ids.shape[1] == int(lengths[rows].max())  # padded to its own longest row only
                assert mb.resp_mask.shape[1] == max(int(full.resp_mask[rows].sum(1).max()), 1)
    assert len(micro_batches(full, 1, 10, False)) > len(micro_batches(full, 1, 60, False))
    assert [len(r) for r in micro_batches(full, 3, None, False)] == [9, 3]  # unequal group-count split


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_objective_sums_over_micro_batches_to_the_step(name):
    """For each objective: losses of the micro-batches (with the step's context) sum to the whole batch's loss,
    and their gradients w.r.t. the log-probs to its gradient, for a row split and a token-budget split."""
    full = to_tensors(ragged_batch(), pad_id=0)
    gen = torch.Generator().manual_seed(1)
    B, T = full.resp_mask.shape
    logp = (full.behaviour_logp + 0.2 * torch.randn(B, T, generator=gen)) * full.resp_mask
    ref = (full.behaviour_logp + 0.2 * torch.randn(B, T, generator=gen)) * full.resp_mask
    prox = (full.behaviour_logp + 0.1 * torch.randn(B, T, generator=gen)) * full.resp_mask
    cfg = config_for(name)

    def loss_of(rows, step):
        x = logp[rows].clone().requires_grad_(True)
        inp = LossInputs(x, full.behaviour_logp[rows], full.resp_mask[rows], full.rewards[rows], full.group_ids[rows],
                         ref_logp=ref[rows], prox_logp=prox[rows], step=step)
        loss, _ = compute_loss(cfg, inp)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    everything = torch.arange(B)
    want_loss, want_grad = loss_of(everything, None)
    ctx = step_context(full.rewards, full.group_ids, full.resp_mask)
    whole = needs_whole_groups(cfg)
    splits = [micro_batches(full, 3, 20, whole), micro_batches(full, 1, None, whole)]
    if not whole:
        splits.append([torch.tensor([0, 4, 7]), torch.tensor([1, 2, 3, 5, 6, 8, 9, 10, 11])])  # rows across groups
    for plan in splits:
        got_loss, got_grad = torch.tensor(0.0), torch.zeros_like(logp)
        for rows in plan:
            loss, grad = loss_of(rows, ctx.at(rows))
            got_loss, got_grad[rows] = got_loss + loss, grad
        torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)  # IPO: losses near 30
        torch.testing.assert_close(got_grad, want_grad, atol=1e-7, rtol=1e-6)


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory) -> str:
    from tests.micro_model import build_micro_model

    return build_micro_model(tmp_path_factory.mktemp("micro"))


def linear_adam(monkeypatch):
    """AdamW's first steps are ~lr * sign(g), blind to the gradient's scale; with eps = lr = 1e3 >> |g| its
    update is ~g itself, so equal updates mean equal gradients (and the moments stay equal step after step)."""
    import learner.learner as module

    plain = module.deepspeed_config

    def config(*args, **kwargs):
        ds = plain(*args, **kwargs)
        ds["optimizer"]["params"].update(lr=1e3, eps=1e3)
        return ds

    monkeypatch.setattr(module, "deepspeed_config", config)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_step_gradient_is_the_same_whatever_the_split(micro_model_dir, dist_env, monkeypatch, stage):
    """One micro-batch, a group-count split of unequal sizes (2 groups + 1 group... of 4) and a token budget:
    after each optimizer step of grpo, dr_grpo (token_sum), gspo (sequence-level) and dpo, the parameters agree
    within 1e-6 of the update; DeepSpeed takes exactly one optimizer step per train_step."""
    from learner.config import LearnerConfig
    from learner.learner import Learner

    linear_adam(monkeypatch)
    batch = ragged_batch()
    splits = {"one": dict(micro_batch_groups=4), "groups_3_1": dict(micro_batch_groups=3),
              "tokens_20": dict(max_tokens_per_micro_batch=20)}
    learners = {k: Learner(LearnerConfig(zero_stage=stage, groups_per_step=4, grad_clip=0.0, track_ref_kl=True,
                                         objective=config_for("grpo"),
                                         **split), micro_model_dir, group_size=3, temperature=0.7)
                for k, split in splits.items()}
    for step, name in enumerate(("grpo", "dr_grpo", "gspo", "dpo"), start=1):
        before = learners["one"].full_state()
        after, micro = {}, {}
        for k, learner in learners.items():
            learner.cfg = learner.cfg.model_copy(update={"objective": config_for(name)})
            micro[k] = learner.train_step(batch)["micro_batches"]
            after[k] = learner.full_state()
            assert learner.engine.global_steps == step, (k, learner.engine.global_steps)
        assert micro["one"] == 1 and micro["groups_3_1"] == 2 and micro["tokens_20"] >= 3, micro
        for key in before:
            update = before[key] - after["one"][key]
            scale = max(float(update.abs().max()), 1e-3)
            for k in ("groups_3_1", "tokens_20"):
                diff = float((after[k][key] - after["one"][key]).abs().max())
                assert diff <= 1e-6 * scale + 1e-7, (name, k, key, diff, scale)


def micro_learner(model_dir: str, **kw):
    from learner.config import LearnerConfig
    from learner.learner import Learner

    kw.setdefault("objective", config_for("grpo"))
    return Learner(LearnerConfig(groups_per_step=4, **kw), model_dir, group_size=3, temperature=0.7)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_forward_keeps_only_the_last_hidden_state_through_the_engine(micro_model_dir, dist_env, monkeypatch, stage):
    """The training forward runs the DeepSpeed engine itself (its backward prologue fires in backward) without
    output_hidden_states, and gives the log-probs of the former every-layer path."""
    from learner.batch import response_logprobs

    learner = micro_learner(micro_model_dir, zero_stage=stage)
    module = learner.engine.module
    mb = to_tensors(ragged_batch(), pad_id=0)
    seen, prologues = [], []
    hooks = [module.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True),
             learner.engine.register_forward_pre_hook(lambda m, a: seen.append("engine"))]
    prologue = learner.engine._backward_prologue
    monkeypatch.setattr(learner.engine, "_backward_prologue", lambda: (prologues.append(1), prologue())[1])
    logp, entropy = learner._forward(learner.engine, mb)
    for h in hooks:
        h.remove()
    assert seen[0] == "engine" and not seen[1].get("output_hidden_states") and seen[1]["logits_to_keep"] == 1
    old = module(input_ids=mb.input_ids, attention_mask=mb.attention_mask, output_hidden_states=True)
    want = response_logprobs(old.hidden_states[-1], module.get_output_embeddings(), mb.input_ids, mb.resp_index,
                             mb.resp_mask, 0.7, 1024)
    torch.testing.assert_close(logp, want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, want[1], atol=1e-6, rtol=0)
    learner.engine.backward((logp * mb.resp_mask).sum())
    assert prologues == [1]  # DeepSpeed's hooks on the engine's outputs saw the tensor the loss flows through


def test_fp32_head_is_closer_to_fp32_than_a_bf16_matmul():
    """bf16 hidden states and head: the fp32 matmul's log-probs are far closer to a float64 computation of the
    same bf16 inputs than the bf16 matmul cast afterwards (the naive path)."""
    from learner.batch import response_logprobs

    gen = torch.Generator().manual_seed(0)
    B, L, H, V = 2, 40, 256, 2000
    hidden = torch.randn(B, L, H, generator=gen).to(torch.bfloat16)  # (B, L, H)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.data = (torch.randn(V, H, generator=gen) * 0.3).to(torch.bfloat16)  # logits of a few units
    input_ids = torch.randint(0, V, (B, L), generator=gen)
    resp_index = torch.arange(10, 39).expand(B, -1)  # (B, T)
    mask = torch.ones(resp_index.shape)
    logits64 = hidden.double() @ head.weight.double().T  # (B, L, V)
    exact = torch.log_softmax(logits64, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1).gather(1, resp_index)
    fp32, _ = response_logprobs(hidden, head, input_ids, resp_index, mask, 1.0, 16, fp32_head=True)
    naive, _ = response_logprobs(hidden, head, input_ids, resp_index, mask, 1.0, 16, fp32_head=False)
    err_fp32, err_naive = float((fp32.detach().double() - exact).abs().max()), float((naive.detach().double() - exact).abs().max())
    assert err_fp32 < 1e-4 and err_naive > 20 * err_fp32, (err_fp32, err_naive)
    head.weight.ds_id = 0  # as if ZeRO-3 partitioned it: the head is called as a module (its forward swapped)
    swapped, _ = response_logprobs(hidden.requires_grad_(True), head, input_ids, resp_index, mask, 1.0, 16, fp32_head=True)
    assert float((swapped.detach().double() - exact).abs().max()) < 1e-4
    assert head.weight.dtype == torch.bfloat16 and "forward" not in head.__dict__  # the swap is undone


@pytest.mark.slow
def test_zero3_reference_is_partitioned_and_gives_the_plain_log_probs(micro_model_dir, dist_env):
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from transformers import AutoModelForCausalLM

    learner = micro_learner(micro_model_dir, zero_stage=3, zero3_persistence_threshold=0, track_ref_kl=True)
    params = list(learner.ref.module.parameters())
    assert params and all(hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)
    assert all(p.numel() == 0 for p in params)  # nothing gathered outside a forward pass
    full = to_tensors(ragged_batch(), pad_id=0)
    plan = learner._plan(full)
    got = learner._frozen_logp(learner.ref, full, plan)
    plain = AutoModelForCausalLM.from_pretrained(micro_model_dir, dtype=torch.float32).eval()
    want = learner._frozen_logp(plain, full, plan)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert float(got.abs().sum()) > 0
    metrics = learner.train_step(ragged_batch())  # a whole step: kl_to_ref from the partitioned reference
    assert metrics["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)  # the policy before its first update is the ref


def test_chunked_logprobs_and_their_gradient_equal_the_full_log_softmax():
    """The chunked head (temperature folded into h, closed-form backward, chunks of 7 tokens) against
    log_softmax over the full (B, L, V) logits: values, entropies and gradients w.r.t. hidden and head."""
    from learner.batch import response_logprobs

    gen = torch.Generator().manual_seed(0)
    B, L, H, V = 3, 20, 16, 50
    hidden = torch.randn(B, L, H, generator=gen, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=False)
    input_ids = torch.randint(0, V, (B, L), generator=gen)
    resp_index = torch.arange(4, 19).expand(B, -1).clone()  # (B, T)
    mask = torch.ones(resp_index.shape)
    mask[1, 9:] = 0.0
    weights = torch.randn(resp_index.shape, generator=gen)  # a loss that is not a plain sum
    logp, entropy = response_logprobs(hidden, head, input_ids, resp_index, mask, 0.7, 7)
    got = torch.autograd.grad((logp * weights * mask).sum(), (hidden, head.weight))
    logp_all = torch.log_softmax(head(hidden)[:, :-1] / 0.7, -1)  # (B, L-1, V)
    want_logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1).gather(1, resp_index)  # (B, T)
    want_entropy = -(logp_all.exp() * logp_all).sum(-1).gather(1, resp_index)
    want = torch.autograd.grad((want_logp * weights * mask).sum(), (hidden, head.weight))
    torch.testing.assert_close(logp, want_logp * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, want_entropy.detach() * mask, atol=1e-5, rtol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
