"""In-flight weight updates: a generation split at the pause, per-token versions from vLLM to the learner."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from actors.config import ActorConfig
from buffer.schema import Rollout, rollouts_from_arrow, rollouts_to_arrow
from learner.batch import staleness_stats, to_tensors

PROMPTS = [("p0", "1+1=", "2"), ("p1", "2+1=", "3"), ("p2", "3+4=", "7"), ("p3", "4+0=", "4")]
N, MAX_TOKENS, TEMPERATURE = 4, 48, 0.8


# ---- fast: the pure pieces --------------------------------------------------------------------------
def _span(version: str, start: int, end: int):
    return SimpleNamespace(version=version, start=start, end=end)  # the fields of vllm.outputs.WeightVersionSpan


def test_token_versions_from_spans():
    from actors.inflight import token_versions_from_spans

    assert token_versions_from_spans([_span("3", 0, 2), _span("5", 2, 5)], 5, "r") == [3, 3, 5, 5, 5]
    with pytest.raises(RuntimeError, match="not contiguous"):
        token_versions_from_spans([_span("3", 0, 2), _span("5", 3, 5)], 5, "r")
    with pytest.raises(RuntimeError, match="cover 4 tokens"):
        token_versions_from_spans([_span("3", 0, 4)], 5, "r")
    with pytest.raises(RuntimeError, match="no weight-version spans"):
        token_versions_from_spans(None, 5, "r")


def test_config_rejects_unknown_update_mode():
    from pydantic import ValidationError

    assert ActorConfig().weight_update_mode == "between_batches"
    with pytest.raises(ValidationError, match="weight_update_mode"):
        ActorConfig(weight_update_mode="sometimes")


def test_inflight_generator_refuses_push_transports_before_starting_an_engine():
    from actors.generator import Generator

    with pytest.raises(ValueError, match="in_flight .* push engine 'nccl'"):
        Generator(ActorConfig(weight_update_mode="in_flight"), "/no/model", "g", 64, weight_transfer_backend="nccl")


def _rollout(rid: str, n_resp: int, policy_version: int, token_versions: list[int] | None = None) -> Rollout:
    return Rollout(rollout_id=rid, prompt_id="p", group_id="g", group_size=3, token_ids=[1, 2] + [3] * n_resp,
                   prompt_len=2, behaviour_logprobs=[-1.0] * n_resp, reward=1.0, policy_version=policy_version,
                   generator_id="t", finish_reason="length", t_start=0.0, t_end=1.0,
                   token_versions=token_versions or [])


def test_learner_staleness_is_per_token():
    # one row split 3/1 between versions 4 and 6, two rows of one version each (as without in-flight updates)
    rows = [_rollout("a", 4, 4, [4, 4, 4, 6]), _rollout("b", 2, 5), _rollout("c", 1, 6)]
    tb = to_tensors(rollouts_to_arrow(rows), pad_id=0)
    assert tb.token_versions.tolist() == [[4, 4, 4, 6], [5, 5, 0, 0], [6, 0, 0, 0]]
    s = staleness_stats(tb, learner_version=7)
    assert s["staleness_max"] == 3 and s["behaviour_version_max"] == 6
    assert s["staleness_mean"] == pytest.approx(((3 * 3 + 1) / 4 + 2 + 1) / 3)  # rows' token means, averaged
    assert s["staleness_token_mean"] == pytest.approx((3 * 3 + 1 + 2 * 2 + 1) / 7)
    # rows of a single version: exactly the per-row metric the learner reported before per-token versions
    uniform = to_tensors(rollouts_to_arrow(rows[1:]), pad_id=0)
    old = (7 - uniform.versions).float()
    s = staleness_stats(uniform, 7)
    assert (s["staleness_mean"], s["staleness_max"]) == (float(old.mean()), float(old.max()))
    assert s["behaviour_version_max"] == float(uniform.versions.max())


# ---- slow: the real async engine --------------------------------------------------------------------
def _long_generator_cls():
    from actors.generator import Generator

    class LongInflightGenerator(Generator):
        """Every response runs to max_tokens (EOS does not stop it, the sampled distribution is unchanged),
        so the tiny model's short answers cannot finish before the pause."""

        def sampling_params(self, greedy: bool = False):
            params = super().sampling_params(greedy)
            params.ignore_eos = not greedy
            return params

    return LongInflightGenerator


def _hf_logprobs(model, row: Rollout) -> torch.Tensor:
    with torch.no_grad():
        ids = torch.tensor([row.token_ids])
        logits = model(input_ids=ids).logits[0, :-1].double() / TEMPERATURE  # (L-1, V)
        logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]  # (L-1,)
    return logp[row.prompt_len - 1:].float()  # (T,)


@pytest.fixture(scope="module")
def split_run(tiny_model_dir):
    """Generate 4 prompts x 4 samples x 48 tokens; once every sample has >= 4 tokens, load version 1 (the same
    model, perturbed) from this thread while generate runs in another."""
    from transformers import AutoModelForCausalLM

    from actors.generator import Prompt

    cfg = ActorConfig(n=N, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, weight_update_mode="in_flight")
    gen = _long_generator_cls()(cfg, tiny_model_dir, "inflight-test", max_model_len=64)
    try:
        old = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        new = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for p in new.parameters():
                p.add_(0.05 * torch.randn_like(p))
        out: dict = {}
        worker = threading.Thread(target=lambda: out.setdefault("result", gen.generate([Prompt(*p) for p in PROMPTS])))
        worker.start()
        deadline = time.monotonic() + 120
        while True:
            seen = gen.engine.progress()
            if len(seen) == len(PROMPTS) * N and min(seen.values()) >= 4:
                break
            assert worker.is_alive() and time.monotonic() < deadline, f"generation ended before the pause: {seen}"
            time.sleep(0.002)
        gen.load_weights(1, iter(new.state_dict().items()))  # lm_head.weight included: the head is tied
        worker.join(timeout=120)
        layout = gen.engine.collective_rpc("relay_weight_layout")
        yield SimpleNamespace(result=out["result"], seen=seen, old=old, new=new, version_after=gen.version, layout=layout)
    finally:
        gen.close()


@pytest.mark.slow
def test_inflight_update_splits_generation_exactly_at_the_pause(split_run):
    """Tokens before the split match the old weights, tokens after it the new ones (a transformers forward over
    the whole sequence, to 1e-4), and token_versions record exactly that split in every sample."""
    tol = 1e-4
    rows = rollouts_from_arrow(split_run.result.batch)
    assert len(rows) == len(PROMPTS) * N and split_run.version_after == 1
    assert split_run.layout == ["plain"]  # the default CPU layout reached the engine process: an in-place copy
    worst_old, worst_new, ambiguous, splits = 0.0, 0.0, 0, []
    for r in rows:
        T = len(r.behaviour_logprobs)
        k = r.token_versions.count(0)
        splits.append(k)
        assert T == MAX_TOKENS and r.finish_reason == "length"
        assert r.token_versions == [0] * k + [1] * (T - k), "one split, old version first"
        assert min(split_run.seen.values()) <= k < T, f"split at {k}: not after the tokens streamed before the pause"
        assert r.policy_version == 0  # the oldest token's version: what the buffer's staleness bound measures
        mu = torch.tensor(r.behaviour_logprobs)  # (T,)
        lp_old, lp_new = _hf_logprobs(split_run.old, r), _hf_logprobs(split_run.new, r)  # (T,), (T,)
        worst_old = max(worst_old, float((mu[:k] - lp_old[:k]).abs().max()))
        worst_new = max(worst_new, float((mu[k:] - lp_new[k:]).abs().max()))
        # the other version explains neither side: the match above is not a tolerance artefact
        assert float((mu[k:] - lp_old[k:]).abs().max()) > 1e-2 and float((mu[:k] - lp_new[:k]).abs().max()) > 1e-2
        # off by one, the boundary token would have to match the other version too (rare: both agree on it)
        ambiguous += float((mu[k] - lp_old[k]).abs()) < tol or float((mu[k - 1] - lp_new[k - 1]).abs()) < tol
    print(f"in-flight split: tokens at the split {sorted(splits)}; streamed before the load >= "
          f"{min(split_run.seen.values())}; |mu - old| {worst_old:.2e} before, |mu - new| {worst_new:.2e} after; "
          f"ambiguous boundaries {ambiguous}; pause+load {split_run.result.load_s:.3f}s")
    assert worst_old < tol, f"tokens before the pause differ from the old weights by {worst_old}"
    assert worst_new < tol, f"tokens after the pause differ from the new weights by {worst_new}"
    assert ambiguous <= 1, f"{ambiguous} samples' boundary tokens match both versions"
    assert split_run.result.load_s > 0  # the pause is counted as weight-load time of the request


@pytest.mark.slow
def test_token_versions_reach_the_buffer_and_the_learner_staleness(split_run):
    """The split survives the buffer (Arrow in, Arrow out) and the learner's batch, whose staleness is per token:
    at learner version 1, old-version tokens are 1 stale and new ones 0 (a per-row metric would say 1)."""
    from buffer.config import BufferConfig
    from buffer.replay import ReplayBuffer

    buf = ReplayBuffer(BufferConfig(max_staleness=1), groups_per_step=len(PROMPTS))
    assert buf.try_admit(len(PROMPTS), 0)
    assert buf.put(split_run.result.batch) == len(PROMPTS)
    served = buf.sample(len(PROMPTS), learner_version=1, timeout=5)
    rows = {r.rollout_id: r for r in rollouts_from_arrow(split_run.result.batch)}
    tb = to_tensors(served, pad_id=0)
    n_old = 0
    for i, rid in enumerate(served.column("rollout_id").to_pylist()):
        assert tb.token_versions[i].tolist() == rows[rid].token_versions
        n_old += rows[rid].token_versions.count(0)
    s = staleness_stats(tb, learner_version=1)
    assert s["staleness_max"] == 1 and s["behaviour_version_max"] == 1
    assert s["staleness_token_mean"] == pytest.approx(n_old / float(tb.resp_mask.sum()))
    assert 0 < s["staleness_mean"] < 1


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()  # another module of the same session may hold a cluster already
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("transport_name", ["object_store", "shared_memory"])
def test_rollout_actor_applies_offered_weights_during_a_request(transport_name, ray_cluster, tmp_path_factory):
    """The Ray shell in in_flight mode: offer_weights runs on a second thread while generate is running; the
    request's rows reach the buffer with the split recorded, and the actor serves the new version after it:
    tokens before the swap match a transformers forward of the old weights, tokens after it the new ones (with
    shared_memory the engine process serves straight from the learner's slot). An untrained model (near-uniform,
    rarely samples EOS) makes responses long enough to be caught mid-way."""
    import ray
    from transformers import AutoModelForCausalLM

    from actors.actor import make_rollout_actor, start_request
    from actors.generator import GenerationResult, Prompt
    from buffer.actor import make_buffer_actor
    from buffer.config import BufferConfig
    from launch.config import ModelConfig
    from launch.model import build_default_model
    from tests.test_generator import _hf_logprobs
    from transport.registry import make_transport

    model_dir = build_default_model(ModelConfig(warm_start_steps=0), max_operand=4,
                                    cache_dir=tmp_path_factory.mktemp("untrained"))
    cfg = ActorConfig(n=8, max_tokens=40, weight_update_mode="in_flight")
    transport = make_transport(transport_name, "")
    buffer = make_buffer_actor(BufferConfig(max_staleness=10), groups_per_step=len(PROMPTS), run_dir=None)
    actor = make_rollout_actor(cfg, "inflight-ray", model_path=model_dir, max_model_len=64,
                               transport=transport, fetch_timeout_s=30)
    try:
        assert ray.get(actor.version.remote(), timeout=300) == 0
        old = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        handle = transport.publish(1, dict(model.state_dict()))
        request, ack = start_request(actor, buffer, [Prompt(*p) for p in PROMPTS], None, "req-0")
        deadline = time.monotonic() + 60
        # a look into the actor on another of its threads, the one offer_weights is about to run on
        sampled = lambda a: sum(a.gen.engine.progress().values())  # noqa: E731  (by value, into the actor)
        while ray.get(actor.__ray_call__.remote(sampled), timeout=30) < 2 * len(PROMPTS) * cfg.n:
            assert time.monotonic() < deadline and not ray.wait([request], timeout=0)[0], "request ended first"
            time.sleep(0.005)
        offer_s = ray.get(actor.offer_weights.remote(handle), timeout=60)  # runs while generate is running
        assert offer_s > 0
        result = GenerationResult.of(ray.get(request, timeout=120))
        assert result.groups == len(PROMPTS) and result.load_s > 0 and ray.get(ack, timeout=60) == len(PROMPTS)
        assert ray.get(actor.version.remote()) == 1
        rows = rollouts_from_arrow(ray.get(buffer.sample.remote(len(PROMPTS), 1, 10)))
        for r in rows:
            k = r.token_versions.count(0)
            assert r.token_versions == [0] * k + [1] * (len(r.token_versions) - k)
            assert r.policy_version == min(r.token_versions)
        worst = 0.0
        for r, lp_old, lp_new in zip(rows, _hf_logprobs(old, rows, cfg.temperature), _hf_logprobs(model, rows, cfg.temperature)):
            ref = torch.where(torch.tensor(r.token_versions) == 0, lp_old, lp_new)
            worst = max(worst, float((torch.tensor(r.behaviour_logprobs) - ref).abs().max()))
        assert worst < 1e-4, f"log-probs differ from transformers' (old weights before the swap, new after) by {worst}"
        spanning = sum(0 < r.token_versions.count(0) < len(r.token_versions) for r in rows)
        print(f"rollout actor: {spanning}/{len(rows)} responses span the update; offer_weights {offer_s:.3f}s")
        assert spanning > 0, "no response spans the update"
        assert ray.get(actor.offer_weights.remote(handle)) == 0.0  # an old or equal version is not applied twice
    finally:
        ray.get(actor.close.remote(), timeout=60)
        ray.kill(actor)
        if hasattr(transport, "close"):
            transport.close()
