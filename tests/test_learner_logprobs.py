"""The learner's log-probs from the response span's hidden states, chunk by chunk, against the full-logits
computation they replace; gradient checkpointing; the reference model only when something reads it."""
from __future__ import annotations

import pytest
import torch

from buffer.schema import rollouts_to_arrow
from buffer.testing import fake_group
from learner.batch import to_tensors
from learner.objectives import REGISTRY, LossInputs, ObjectiveConfig, compute_loss
from learner.objectives.config import READS

pytestmark = pytest.mark.slow  # in-process DeepSpeed learners on the tiny model: seconds each


def full_logits_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, resp_index: torch.Tensor, temperature: float):
    """The straightforward computation (the learner's former path), kept here as the reference only:
    a full-vocabulary fp32 log_softmax over every position, (B, L-1, V)."""
    logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, L-1, V)
    logp_tok = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, L-1)
    return logp_tok.gather(1, resp_index), entropy.detach().gather(1, resp_index)  # (B, T), (B, T)


def ragged_batch(vocab: int):
    """Groups of different prompt and response lengths, so rows are padded differently; token ids < vocab."""
    rows = []
    for gid, (prompt_len, response_len) in {"a": (3, 5), "b": (7, 2), "c": (4, 9)}.items():
        group = fake_group(gid, group_size=2, prompt_len=prompt_len, response_len=response_len)
        for k, r in enumerate(group):
            r.token_ids = [(3 * t + 5 * k + ord(gid)) % vocab for t in range(prompt_len + response_len)]
        rows += group
    return to_tensors(rollouts_to_arrow(rows), pad_id=0)


def make_learner(model_dir: str, **kw):
    from learner.config import LearnerConfig
    from learner.learner import Learner

    objective = kw.pop("objective", ObjectiveConfig(max_len=9))
    cfg = LearnerConfig(groups_per_step=3, micro_batch_groups=3, lr=1e-2, objective=objective, **kw)
    return Learner(cfg, model_dir, group_size=2, temperature=0.7)


def loss_inputs(logp: torch.Tensor, mb) -> LossInputs:
    gen = torch.Generator().manual_seed(0)

    def near():
        return logp.detach() + 0.3 * torch.randn(logp.shape, generator=gen)  # (B, T)

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.0, 1.0])  # (B,)
    return LossInputs(logp, near(), mb.resp_mask, rewards, mb.group_ids, ref_logp=near(), prox_logp=near())


def config_for(name: str) -> ObjectiveConfig:
    knobs = {"beta": 0.1} if "beta" in READS[name] else {}
    return ObjectiveConfig(name=name, **knobs, **({"max_len": 9} if "max_len" in READS[name] else {}))


def test_chunked_response_logprobs_equal_the_full_logits_path(tiny_model_dir, dist_env):
    """Values (logp, entropy) through the DeepSpeed engine and through its module, and every objective's loss
    and parameter gradients, equal the full-logits computation within 1e-5; chunks of 4 tokens split rows."""
    learner = make_learner(tiny_model_dir, logprob_chunk_tokens=4)
    mb = ragged_batch(learner.engine.module.config.vocab_size)
    mask = mb.resp_mask > 0
    module = learner.engine.module
    with torch.no_grad():
        logits = module(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits  # (B, L, V)
        ref_logp, ref_entropy = full_logits_logprobs(logits, mb.input_ids, mb.resp_index, 0.7)
        for model in (learner.engine, module):
            logp, entropy = learner._forward(model, mb)
            torch.testing.assert_close(logp[mask], ref_logp[mask], atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[mask], ref_entropy[mask], atol=1e-5, rtol=0)
            assert (logp[~mask] == 0).all()
    params = [p for p in module.parameters() if p.requires_grad]
    for name in sorted(REGISTRY):
        cfg = config_for(name)
        chunked, _ = compute_loss(cfg, loss_inputs(learner._forward(module, mb)[0], mb))
        logits = module(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits  # (B, L, V)
        full, _ = compute_loss(cfg, loss_inputs(full_logits_logprobs(logits, mb.input_ids, mb.resp_index, 0.7)[0], mb))
        torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0, msg=name)
        got = torch.autograd.grad(chunked, params, allow_unused=True)
        want = torch.autograd.grad(full, params, allow_unused=True)
        for g, w in zip(got, want):
            w = torch.zeros_like(g) if w is None else w
            scale = max(float(w.abs().max()), 1.0)  # fp32: IPO's squared margin gives entries near 800
            assert float((g - w).abs().max()) <= 1e-5 * scale, (name, float((g - w).abs().max()), scale)


def test_gradient_checkpointing_changes_neither_loss_nor_gradients(tiny_model_dir, dist_env):
    from buffer.testing import fake_batch

    plain = make_learner(tiny_model_dir, objective=ObjectiveConfig(max_len=8))
    ckpt = make_learner(tiny_model_dir, objective=ObjectiveConfig(max_len=8), gradient_checkpointing=True)
    assert ckpt.engine.module.is_gradient_checkpointing and not plain.engine.module.is_gradient_checkpointing
    mb = ragged_batch(plain.engine.module.config.vocab_size)
    grads = []
    for learner in (plain, ckpt):
        module = learner.engine.module
        loss, _ = compute_loss(ObjectiveConfig(max_len=9), loss_inputs(learner._forward(module, mb)[0], mb))
        params = [p for p in module.parameters() if p.requires_grad]
        grads.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    batch = fake_batch(["a", "b", "c"], group_size=2)
    step_a, step_b = plain.train_step(batch), ckpt.train_step(batch)  # a whole step through DeepSpeed
    assert step_a["loss"] == pytest.approx(step_b["loss"], abs=1e-6)
    after_a, after_b = plain.full_state(), ckpt.full_state()
    assert max(float((after_a[k] - after_b[k]).abs().max()) for k in after_a) < 1e-6


def test_reference_model_only_when_read_and_token_sum_needs_its_constant(tiny_model_dir, dist_env):
    assert make_learner(tiny_model_dir).ref is None  # reinforce, track_ref_kl off by default
    assert make_learner(tiny_model_dir, track_ref_kl=True).ref is not None
    assert make_learner(tiny_model_dir, objective=ObjectiveConfig(name="agro", beta=0.1, max_len=9)).ref is not None
    with pytest.raises(ValueError, match="learner.objective.max_len"):
        make_learner(tiny_model_dir, objective=ObjectiveConfig(name="dr_grpo"))
