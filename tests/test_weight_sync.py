"""Weight sync proofs with real DeepSpeed and a real vLLM engine on the tiny model.

After an update, the generator's log-probs equal a transformers forward pass with
the learner's weights (ZeRO 0, 2 and 3, tied embeddings); the prefix cache does
not serve blocks computed under old weights; a missed version is skipped; a
transfer that fails mid-way leaves the generator serving the old version whole.
One vLLM engine is shared by the whole module.
"""
from __future__ import annotations


import pytest
import torch

from tests.test_generator import _check_match
from transport.disk import DiskTransport

pytestmark = pytest.mark.slow

# 42-token prompts: with 32-token KV blocks the first block of each is cached and reused by the next request
PROMPTS_TEXT = [f"{i}+" * 20 + "1=" for i in range(4)]


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from actors.config import ActorConfig
    from actors.generator import Generator

    cfg = ActorConfig(n=4, max_tokens=6, temperature=0.8, top_k=0, enable_prefix_caching=True)
    gen = Generator(cfg, tiny_model_dir, "gen-w", max_model_len=64, weight_transfer_backend="relay_cpu",
                    engine_kwargs={"block_size": 32})
    assert gen.engine.llm.llm_engine.vllm_config.cache_config.block_size == 32
    return gen


@pytest.fixture(scope="module")
def push(generator):
    from transport.cpu_push import CpuBucketPushTransport

    t = CpuBucketPushTransport(bucket_mb=0.05, timeout_s=60)  # ~50 KiB buckets: the 1.3 MB model travels in many
    t.connect({"gen-w": generator})
    yield t
    t.close()


def _prompts():
    from actors.generator import Prompt

    return [Prompt(f"p{i}", text, "0") for i, text in enumerate(PROMPTS_TEXT)]


def _hf(model_dir, state=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)  # every name, tied lm_head included
    return model


def _perturbed(model_dir, seed: int) -> dict[str, torch.Tensor]:
    model = _hf(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _worst(generator, model) -> float:
    try:
        _check_match(generator, model, _prompts(), tol=0.0)
    except AssertionError as exc:
        return float(str(exc).split("transformers by ")[1].split()[0])
    return 0.0


def test_prefix_cache_never_serves_blocks_of_old_weights(generator, push, tiny_model_dir):
    prompt_len = len(generator.encode(_prompts()[0]))
    assert prompt_len > 32, "prompts must fill a KV block for the prefix cache to matter"
    _check_match(generator, _hf(tiny_model_dir), _prompts(), tol=1e-4)  # caches the prompts' first blocks

    # negative control: new weights WITHOUT a cache reset reuse stale blocks, so this check can fail
    s1 = _perturbed(tiny_model_dir, seed=1)
    generator.engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(s1.items()), "is_checkpoint_format": True})
    assert _worst(generator, _hf(tiny_model_dir, s1)) > 1e-2

    generator.load_weights(1, iter(s1.items()))  # the pull path resets the cache
    rows = _check_match(generator, _hf(tiny_model_dir, s1), _prompts(), tol=1e-4)
    assert {r.policy_version for r in rows} == {1}

    s2 = _perturbed(tiny_model_dir, seed=2)  # the push path (vLLM weight-transfer API) resets it too
    handle = push.publish(2, s2)
    assert generator.version == 2 and len(handle.payload["buckets"]) > 5
    rows = _check_match(generator, _hf(tiny_model_dir, s2), _prompts(), tol=1e-4)
    assert {r.policy_version for r in rows} == {2}


def _train_batch(generator):
    """Two whole groups from the engine itself, rewards 0/1 within each group so the update is not zero."""
    from buffer.schema import rollouts_from_arrow, rollouts_to_arrow

    rows = rollouts_from_arrow(generator.generate(_prompts()[:2]).batch)
    for i, r in enumerate(rows):
        r.reward = float(i % 2)
    return rollouts_to_arrow(rows)


@pytest.mark.parametrize("stage,path", [(0, "pull"), (2, "push"), (3, "push")])
def test_generator_matches_learner_weights_under_zero(stage, path, generator, push, tiny_model_dir, dist_env, tmp_path):
    from learner.config import LearnerConfig
    from learner.objectives import ObjectiveConfig
    from learner.learner import Learner

    cfg = LearnerConfig(zero_stage=stage, zero3_persistence_threshold=0 if stage == 3 else None, groups_per_step=2,
                        micro_batch_groups=2, lr=3e-2, objective=ObjectiveConfig(max_len=6))
    learner = Learner(cfg, tiny_model_dir, group_size=4, temperature=0.8)
    for _ in range(2):
        learner.train_step(_train_batch(generator))
    if stage == 3:  # really partitioned: outside a gather no rank holds any full parameter
        assert all(p.numel() == 0 for p in learner.engine.module.parameters())
    state = learner.full_state()
    ckpt = _hf(tiny_model_dir).state_dict()
    assert set(state) == set(ckpt) and "lm_head.weight" in state
    assert max(float((state[k] - ckpt[k]).abs().max()) for k in state) > 1e-3, "training did not move the weights"
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # tied, sent under both names
    saved = _hf(learner.save_pretrained(str(tmp_path / "hf"))).state_dict()  # the export path reads the same state
    assert all(torch.equal(saved[k], state[k]) for k in state)

    version = 10 + stage
    if path == "pull":
        disk = DiskTransport(str(tmp_path))
        generator.load_weights(version, disk.fetch(disk.publish(version, state), timeout_s=10))
    else:
        push.publish(version, state)
    assert generator.version == version
    rows = _check_match(generator, _hf(tiny_model_dir, state), _prompts(), tol=1e-4)
    assert {r.policy_version for r in rows} == {version}


def test_failed_transfer_leaves_old_version_whole(generator, push, tiny_model_dir):
    from transport.cpu_push import CpuBucketPushTransport

    old = _perturbed(tiny_model_dir, seed=7)
    v = generator.version + 1
    generator.load_weights(v, iter(old.items()))
    new = _perturbed(tiny_model_dir, seed=8)

    def broken_fetch():  # half the tensors arrive, then the peer dies
        for i, item in enumerate(new.items()):
            if i == len(new) // 2:
                raise TimeoutError(f"weights version {v + 1}: object store get exceeded 1s")
            yield item

    with pytest.raises(TimeoutError, match=f"weights version {v + 1}"):
        generator.load_weights(v + 1, broken_fetch())
    assert generator.version == v
    _check_match(generator, _hf(tiny_model_dir, old), _prompts(), tol=1e-4)  # serves the old version, whole

    class LosesSecondBucket:
        """A generator whose second bucket of the update is missing from shared memory."""

        def __getattr__(self, name):
            return getattr(generator, name)

        def apply_weight_update(self, info, version):
            buckets = [dict(b) for b in info["buckets"]]
            buckets[1]["path"] += ".gone"
            generator.apply_weight_update({"buckets": buckets}, version)

    flaky = CpuBucketPushTransport(bucket_mb=0.05, timeout_s=60)
    flaky.connect({"gen-w": LosesSecondBucket()})
    with pytest.raises(RuntimeError, match=f"weights version {v + 1}: apply_weight_update failed on generator gen-w"):
        flaky.publish(v + 1, new)
    flaky.close()
    assert generator.version == v
    with pytest.raises(RuntimeError, match="did not finish"):  # refuses to serve a possible mix
        generator.generate(_prompts())

    push.publish(v + 1, new)  # the next whole update recovers
    assert generator.version == v + 1
    _check_match(generator, _hf(tiny_model_dir, new), _prompts(), tol=1e-4)


def _param_ptrs(worker) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in worker.model_runner.get_model().named_parameters()}


def _matmuls(worker) -> set[str]:
    return {getattr(m.cpu_linear, "__name__", type(m.cpu_linear).__name__)
            for m in worker.model_runner.get_model().modules() if hasattr(m, "cpu_linear")}


def _packed_layers(worker) -> tuple[int, int]:
    """(layers multiplying by a packed copy of the version now loaded, plain layers the model multiplies by: an
    untied embedding has a matmul too, never called)."""
    from transport.plain_weights import LazyPacked

    lazy = [m.cpu_linear for m in worker.model_runner.get_model().modules() if isinstance(getattr(m, "cpu_linear", None), LazyPacked)]
    return sum(f.packed() for f in lazy), sum(f.calls > 0 or f.handle is not None for f in lazy)


def serve_until_packed(generator) -> None:
    """Generate until every plain layer has packed its weight (a version's first PACK_AFTER_CALLS calls do not)."""
    for _ in range(20):
        packed, layers = generator.engine.llm.collective_rpc(_packed_layers)[0]
        if packed == layers >= 5:  # at least one decoder layer's four and the LM head
            return
        generator.generate(_prompts())
    raise AssertionError(f"{packed} of {layers} layers packed after 20 requests")


def test_plain_layout_copies_in_place_and_an_incomplete_version_is_refused(generator, tiny_model_dir):
    """The default CPU layout: an update writes into the memory the engine already reads (no re-created or
    repacked layers), and a version that does not cover every parameter leaves the generator refusing to serve.
    Every linear layer, the LM head included, multiplies by its live weight for a version's first calls, then by a
    packed copy of it; a load drops the copies, and the packs made after it hold the new weights."""
    assert generator.engine.in_place
    assert generator.engine.llm.collective_rpc(_matmuls)[0] == {"LazyPacked"}
    before = generator.engine.llm.collective_rpc(_param_ptrs)[0]
    serve_until_packed(generator)  # every layer holds a packed copy of the version before
    state = _perturbed(tiny_model_dir, seed=21)
    v = generator.version + 1
    generator.load_weights(v, iter(state.items()))
    assert generator.engine.llm.collective_rpc(_param_ptrs)[0] == before
    assert generator.engine.llm.collective_rpc(_packed_layers)[0][0] == 0, "a packed copy of the old version survived the load"
    _check_match(generator, _hf(tiny_model_dir, state), _prompts(), tol=1e-4)  # the live weights
    serve_until_packed(generator)
    _check_match(generator, _hf(tiny_model_dir, state), _prompts(), tol=1e-4)  # the packed copies of the new ones

    partial = {k: t for k, t in _perturbed(tiny_model_dir, seed=22).items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match=r"did not cover 2 parameter\(s\).*layers\.1\.mlp"):
        generator.load_weights(v + 1, iter(partial.items()))
    assert generator.version == v
    with pytest.raises(RuntimeError, match="did not finish"):
        generator.generate(_prompts())
    generator.load_weights(v + 1, iter(state.items()))  # a whole version recovers
    _check_match(generator, _hf(tiny_model_dir, state), _prompts(), tol=1e-4)


class _CountingDisk(DiskTransport):
    """A WeightTransport test double: the disk transport, counting fetches per version."""

    def __init__(self, directory):
        super().__init__(directory)
        self.fetched: list[int] = []

    def fetch(self, handle, timeout_s):
        self.fetched.append(handle.version)
        return super().fetch(handle, timeout_s)


def test_missed_version_is_skipped(tiny_model_dir, tmp_path):
    """The rollout actor's own sync logic (a real RolloutActor with its own engine, outside Ray)."""
    from actors.actor import RolloutActor
    from actors.config import ActorConfig

    transport = _CountingDisk(str(tmp_path))
    actor = RolloutActor(ActorConfig(n=4, max_tokens=6, temperature=0.8, top_k=0), tiny_model_dir, "gen-skip",
                         max_model_len=64, transport=transport, fetch_timeout_s=10.0)
    states = {v: _perturbed(tiny_model_dir, seed=100 + v) for v in (1, 2, 3)}
    handles = {1: transport.publish(1, states[1])}
    actor.sync(handles[1])
    handles.update({v: transport.publish(v, states[v]) for v in (2, 3)})
    actor.sync(handles[3])  # v2 was published meanwhile; only the newest is handed over
    actor.sync(handles[2])  # a late, older handle changes nothing
    assert transport.fetched == [1, 3]
    assert actor.version() == 3
    _check_match(actor.gen, _hf(tiny_model_dir, states[3]), _prompts(), tol=1e-4)


def test_packed_layout_loads_through_vllms_reload(tiny_model_dir):
    """vLLM's own CPU layout (oneDNN-packed linears) still updates correctly, through the layerwise reload.
    (Its own engine, after the module's shared one is done: a second engine in the process resets vLLM's
    global parallel state.)"""
    from actors.config import ActorConfig
    from actors.generator import Generator

    cfg = ActorConfig(n=4, max_tokens=6, temperature=0.8, top_k=0, cpu_weight_layout="packed")
    gen = Generator(cfg, tiny_model_dir, "gen-packed", max_model_len=64)
    assert not gen.engine.in_place
    linears = gen.engine.llm.collective_rpc(lambda w: [type(m).__name__ for m in w.model_runner.get_model().modules()
                                                if getattr(m, "cpu_linear", None) is torch.nn.functional.linear])[0]
    assert linears == [], f"layers not packed: {linears}"
    state = _perturbed(tiny_model_dir, seed=23)
    gen.load_weights(1, iter(state.items()))
    rows = _check_match(gen, _hf(tiny_model_dir, state), _prompts(), tol=1e-4)
    assert {r.policy_version for r in rows} == {1}
