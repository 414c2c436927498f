"""Weight sync: learner-to-generator publish bandwidth against memcpy, and how long the learner is blocked.

One publish is timed from the driver: a DeepSpeed learner rank (Relay's `Learner`
in its `LearnerRank` shell) hands its full weights to the transport and returns a
handle; a rollout actor then applies that version (shared_memory, the reported
transport: the rank's second thread copies the weights into a /dev/shm slot in
vLLM's layout and the generator serves from it; object_store, measured alongside:
copy into Ray's store, then into the engine's parameters). Effective bandwidth = bytes published / (publish
start -> the generator serves the new version), with nothing else running.
The reference is a large `torch` tensor `copy_` into an existing buffer, in the
same run.

Then the same publish again, but as in a run: the learner trains its next batch
(a real `train_step`) while the version travels. The learner is blocked for the
publish call itself plus what that step's optimizer update waited for the
publish to finish reading the weights (`weight_sync_wait_s`), reported as a
fraction of that sync's window.

    .venv/bin/python -m benchmarks.weight_sync [--quick]
"""
from __future__ import annotations

import socket
import statistics
import time

import ray
import torch

from actors.config import ActorConfig
from benchmarks.common import build_bench_model, module_main, result, spread
from benchmarks.rollout import start_actors
from buffer.testing import fake_group_fast
from learner.actor import LearnerRank
from learner.config import LearnerConfig
from learner.objectives import ObjectiveConfig
from transport.registry import make_transport


class PublishingRank(LearnerRank):
    """Relay's learner rank plus a timed publish. The version is advanced without a training step: the
    payload is the same full weights either way, and the generator only loads versions newer than its own."""

    def timed_publish(self):
        self.learner.step += 1
        return self._publish()  # what train_step does: (handle, seconds the learner was blocked)


def memcpy_bytes_per_s(nbytes: int, repeats: int) -> list[float]:
    """`dst.copy_(src)` of nbytes (float32), pages touched beforehand: the machine's copy bandwidth."""
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        out.append(nbytes / (time.perf_counter() - t0))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_once(rank, actor, batch=None) -> tuple:
    """Publish one version and wait until the generator serves it: (handle, publish_s, fetch_load_s, total_s,
    ObjectRef of the learner's next train_step on `batch` if given, started as soon as the publish returned)."""
    t0 = time.perf_counter()
    handle, publish_s = ray.get(rank.timed_publish.remote())
    training = None if batch is None else rank.train_step.remote(batch, False)
    load_s = ray.get(actor.sync.remote(handle))
    total = time.perf_counter() - t0
    served = ray.get(actor.version.remote())
    if served != handle.version:
        raise RuntimeError(f"weight_sync: generator serves version {served}, expected {handle.version}")
    return handle, publish_s, load_s, total, training


def measure(transport_name: str, model_path: str, repeats: int, copy_bytes: int) -> list[dict]:
    """`repeats` samples of one transport: an isolated sync, then one while the learner trains its next batch."""
    transport = make_transport(transport_name, "")
    lcfg = LearnerConfig(groups_per_step=1, micro_batch_groups=1, objective=ObjectiveConfig(max_len=8))
    rank = ray.remote(PublishingRank).options(
        num_cpus=1, max_concurrency=2,  # as make_learner_ranks: the store copy runs on a second thread
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    ).remote(lcfg, model_path, 8, 1.0, 0, 1, "127.0.0.1", free_port(), transport)
    [actor] = start_actors(ActorConfig(), model_path, 1, transport=transport)
    try:
        ray.get(rank.node_ip.remote())
        for _ in range(3):  # first loads allocate (shared memory: the two slots the versions alternate between); not timed
            ray.get(actor.sync.remote(ray.get(rank.timed_publish.remote())[0]))
        batch = fake_group_fast("g", 8, response_len=8, prompt_len=6)  # one group, as the rank was built for; ids < vocab 15
        ray.get(rank.train_step.remote(batch, False))  # first step allocates the optimizer state; not timed
        samples = []
        for _ in range(repeats):
            copy_bw = statistics.median(memcpy_bytes_per_s(copy_bytes, 3))
            handle, publish_s, load_s, total, _ = sync_once(rank, actor)
            # as in a run: the learner trains the next batch while the version travels
            _, publish2_s, _, total2, training = sync_once(rank, actor, batch)
            waited = ray.get(training)["metrics"]["weight_sync_wait_s"]
            # shared_memory: how long the learner's copy into the slot took (the object store's ref holds the weights)
            write_s = {"write_s": round(ray.get(handle.payload)["write_s"], 4)} if handle.transport == "shared_memory" else {}
            samples.append({"bytes": handle.nbytes, "publish_s": round(publish_s, 4), "fetch_load_s": round(load_s, 4), **write_s,
                            "total_s": round(total, 4), "sync_bytes_per_s": round(handle.nbytes / total),
                            "memcpy_bytes_per_s": round(copy_bw), "training_publish_s": round(publish2_s, 4),
                            "training_wait_s": round(waited, 4), "training_blocked_s": round(publish2_s + waited, 4),
                            "training_total_s": round(total2, 4)})
    finally:
        ray.kill(rank)
        ray.kill(actor)
        transport.close()
    return samples


def _ratios(samples: list[dict]) -> dict:
    med = lambda k: statistics.median(s[k] for s in samples)  # noqa: E731
    return {"sync_vs_memcpy": round(med("sync_bytes_per_s") / med("memcpy_bytes_per_s"), 3),
            "blocked_fraction": round(med("training_blocked_s") / med("training_total_s"), 4),
            "total_s": med("total_s")}


def run(quick: bool) -> list[dict]:
    """Two results, `weight_sync_vs_memcpy` and `learner_blocked_fraction`, for the fastest CPU transport
    (shared_memory: one copy, learner -> a slot vLLM serves from); the object store's numbers ride along."""
    hidden, layers, repeats, copy_bytes = (128, 2, 2, 2**28) if quick else (768, 11, 4, 2**30)
    model_path, params = build_bench_model(hidden, layers)
    samples = measure("shared_memory", model_path, repeats, copy_bytes)
    object_store = measure("object_store", model_path, max(repeats // 2, 1), copy_bytes)
    cfg = {"params": params, "hidden": hidden, "layers": layers, "transport": "shared_memory", "memcpy_bytes": copy_bytes,
           "object_store": _ratios(object_store) | {"samples": object_store}}
    sync = statistics.median(s["sync_bytes_per_s"] for s in samples)
    copy = statistics.median(s["memcpy_bytes_per_s"] for s in samples)
    blocked = statistics.median(s["training_blocked_s"] for s in samples)
    window = statistics.median(s["training_total_s"] for s in samples)
    return [
        result("weight_sync_vs_memcpy", sync, copy, "bytes/s", 0.5, samples,
               spread=spread([s["sync_bytes_per_s"] / s["memcpy_bytes_per_s"] for s in samples]), config=cfg),
        result("learner_blocked_fraction", blocked, window, "s", 0.1, samples, lower_is_better=True,
               spread=spread([s["training_blocked_s"] / s["training_total_s"] for s in samples]), config=cfg),
    ]


if __name__ == "__main__":
    module_main(run, __doc__)
