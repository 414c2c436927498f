"""The judge service under Ray (actors/judge_pool.py): requests scored on a pool and put to a real replay buffer; a
judge SIGKILLed and another SIGSTOPped (stuck past timeout_s) mid-run are replaced, their chunks scored again on
another actor, and every row is stored once with the reward a direct Judge gives it; duplicates are refused; the
pool resizes."""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from actors.judge import Judge, JudgeWork
from actors.reward_config import RewardModelConfig
from buffer.schema import RequestRows, Rollout, rollouts_to_arrow
from tests.tiny_judge import build_judge

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is 2+3?"}]
R = 40  # requests of 3 groups of 4: enough work that the faults land while chunks are being scored
WORDS = ["5", "The answer is 5.", "hello", "world 5", "5 5 5", "What?", "answer", "is it 5"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _request(k: int, groups: int, n: int) -> tuple:
    """A request's record batch (rewards 0) and the JudgeWork covering every group."""
    rows, work = [], JudgeWork("rm", [], [])
    for g in range(groups):
        gid = uuid.uuid4().hex
        responses = [f"{WORDS[(k + g + i) % len(WORDS)]} {k}.{g}.{i} " + "hello world " * 6 for i in range(n)]
        work.rows.append(list(range(len(rows), len(rows) + n)))
        work.groups.append((CHAT, responses))
        for i, text in enumerate(responses):
            rows.append(Rollout(f"{gid}-{i}", f"p{k}", gid, n, [1, 2, 3], 2, [-0.5], 0.0, 0, "gen-0", "stop",
                                time.time(), time.time(), response_text=text))
    return rollouts_to_arrow(rows), work


def test_pool_replaces_killed_and_stuck_judges_and_scores_every_row_once(ray_local, tmp_path):
    import ray

    from actors.judge_pool import make_judge_service
    from buffer.actor import make_buffer_actor
    from buffer.config import BufferConfig

    path = build_judge(tmp_path / "rm")
    # one row per forward, so a request takes a while and faults land mid-run
    cfg = RewardModelConfig(path=path, num_actors=2, num_cpus=0.5, max_tokens_per_batch=1, timeout_s=8.0)
    buffer = make_buffer_actor(BufferConfig(capacity_groups=4096, staleness_policy="drop", max_staleness=10**9),
                               groups_per_step=1, run_dir=None)
    service = make_judge_service({"rm": (cfg, path)}, buffer, str(tmp_path), startup_timeout_s=120)
    assert ray.get(service.start.remote(), timeout=180) == {"rm": 2}

    def pids():
        return [a["pid"] for a in ray.get(service.snapshot.remote())["rm"] if a["pid"]]

    _until(lambda: len(pids()) == 2)
    requests = [_request(k, groups=3, n=4) for k in range(R)]
    refs = [service.put_rows.remote(RequestRows(batch, {}, [work]), f"req-{k}")
            for k, (batch, work) in enumerate(requests)]
    _until(lambda: ray.get(service.stats.remote())["models"]["rm"].get("chunks_scored", 0) >= 1)
    first, second = pids()[:2]
    os.kill(first, signal.SIGKILL)  # dead: its call fails at once
    os.kill(second, signal.SIGSTOP)  # stuck: only rewards.models.rm.timeout_s finds it
    try:
        stored = ray.get(refs, timeout=300)
    finally:
        os.kill(second, signal.SIGCONT) if _alive(second) else None
    assert stored == [3] * len(requests)
    stats = ray.get(service.stats.remote())
    rm = stats["models"]["rm"]
    assert rm["actor_failures"] >= 2 and rm["rows_rescored"] > 0 and rm["chunks_rescored"] > 0, stats
    assert rm["rows_scored"] == R * 3 * 4 and stats["rows_judged"] == R * 3 * 4, stats  # each row once
    assert stats["reward_faults"] == {}
    events = (tmp_path / "judge_events.jsonl").read_text()
    assert '"judge_failed"' in events and '"judge_restarted"' in events and "timeout_s=8s" in events
    assert "rm-" in events  # the events name the actor
    # every row stored once, with exactly the reward a local Judge gives it
    ledger = ray.get(buffer.ledger.remote())
    assert sorted(ledger["requests"]) == sorted(f"req-{k}" for k in range(R))
    batch = ray.get(buffer.sample.remote(R * 3, 0, 10))
    got = dict(zip(batch.column("response_text").to_pylist(), batch.column("reward").to_pylist()))
    assert len(got) == R * 3 * 4
    judge = Judge(cfg, "rm", path)
    for _, work in requests:
        for (_, responses), scored in zip(work.groups, judge.score_groups(work.groups)):
            for text, (value, _) in zip(responses, scored):
                assert got[text] == pytest.approx(value, abs=1e-4), text  # float32 column
    # a request already stored is not scored again
    again = ray.get(service.put_rows.remote(RequestRows(requests[0][0], {}, [requests[0][1]]), "req-0"), timeout=60)
    assert again == -1 and ray.get(service.stats.remote())["duplicates_refused"] == 1
    # rows no judge scores (another source's reward scored them in the actor) go straight on to the buffer
    plain = _request(R, groups=2, n=4)[0]
    assert ray.get(service.put_rows.remote(RequestRows(plain, {"prompt_too_long": 1}), "req-plain"), timeout=60) == 2
    assert ray.get(buffer.ledger.remote())["requests"]["req-plain"]["skipped"] == {"prompt_too_long": 1}
    assert ray.get(service.stats.remote())["requests_scored"] == R  # not scored by a judge
    # the pool resizes at run time (launch.scale's reward_actors)
    ray.get(service.scale.remote("rm", 3))
    _until(lambda: len(pids()) == 3)
    ray.get(service.scale.remote("rm", 1))  # idle judges leave at once
    assert len(ray.get(service.snapshot.remote())["rm"]) == 1
    remote = ray.get(service.score.remote("rm", requests[0][1].groups), timeout=60)  # evaluation's path
    local = judge.score_groups(requests[0][1].groups)
    assert [v for g in remote for v, _ in g] == pytest.approx([v for g in local for v, _ in g], abs=1e-5)
    ray.get(service.close.remote())
    for a in (service, buffer):
        ray.kill(a)
    # a dead service scores nothing more: the launcher stops the run naming it rather than re-issuing forever
    from launch.judge_service import judge_failure

    with pytest.raises(ray.exceptions.RayActorError) as err:
        ray.get(service.put_rows.remote(RequestRows(requests[1][0], {}, [requests[1][1]]), "req-new"), timeout=60)
    with pytest.raises(RuntimeError, match="the judge service died"):
        judge_failure(err.value, service)
    judge_failure(err.value, buffer)  # another actor's death: a lost request, re-issued (no raise)


def _until(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_judge_that_fails_every_time_fails_the_request_naming_it(ray_local, tmp_path):
    """max_failures in a row: the submission fails with an error naming the actor (the launcher stops the run)."""
    import ray

    from actors.judge_pool import make_judge_service
    from buffer.actor import make_buffer_actor
    from buffer.config import BufferConfig

    path = build_judge(tmp_path / "rm")
    cfg = RewardModelConfig(path=path, num_actors=1, num_cpus=0.5, max_failures=2, timeout_s=30)
    buffer = make_buffer_actor(BufferConfig(), groups_per_step=1, run_dir=None)
    service = make_judge_service({"rm": (cfg, path)}, buffer, None, startup_timeout_s=120)
    ray.get(service.start.remote(), timeout=180)
    batch, work = _request(0, groups=1, n=2)
    work.groups = [(CHAT, ["ok", 5])]  # a chunk the judge cannot render: its call raises every time
    with pytest.raises(Exception) as err:
        ray.get(service.put_rows.remote(RequestRows(batch, {}, [work]), "req-x"), timeout=120)
    assert "judge rm-0.r1 failed 2 times in a row" in str(err.value) and "max_failures=2" in str(err.value)
    from launch.judge_service import judge_failure

    with pytest.raises(RuntimeError, match="rm-0.r1 failed 2 times"):
        judge_failure(err.value)
    for a in (service, buffer):
        ray.kill(a)
