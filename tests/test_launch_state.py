"""The launcher's pure parts: its state record (what checkpoints hold) and its deadline bookkeeping."""
from __future__ import annotations

import json
import time

from actors.generator import Prompt
from launch.calls import Calls
from launch.state import RunState


def test_run_state_survives_json_whole():
    state = RunState(step=7, stream={"epoch": 1, "index": 3}, rollout_actors=2)
    open_req = state.new_request([Prompt("p1", "1+1=", "2"), Prompt("p2", "2+2=", "4")])
    done = state.new_request([Prompt("p3", "3+3=", "6")], start_step=8)  # reserved a step ahead
    del state.requests[done.id]  # acknowledged: no longer open
    open_req.attempts, open_req.offered_version, open_req.start_step = 2, 6, 7
    state.skipped.update({"prompt_too_long": 3})
    state.reward_faults.update({"nan": 1})
    state.trained.update(["g1", "g1", "g2"])
    restored = RunState.from_json(json.loads(json.dumps(state.to_json())))
    assert restored == state and restored.requests[open_req.id].start_step == 7
    assert restored.requests[open_req.id].prompts[1] == Prompt("p2", "2+2=", "4")
    assert restored.trained["g1"] == 2 and restored.skipped["prompt_too_long"] == 3
    assert (restored.request_seq, restored.groups_dispatched) == (2, 3)  # ids keep counting after a resume
    assert restored.new_request([]).id == "req-000000002"


def test_calls_hand_back_overdue_ones_once():
    calls = Calls()
    calls.add("slow", "generate", timeout_s=0.05, data="r1")
    calls.add("fine", "learn", timeout_s=60)
    calls.add("other", "admit", timeout_s=60)
    assert calls.overdue() == []
    time.sleep(0.06)
    late = calls.overdue()
    assert [(ref, c.kind, c.data) for ref, c in late] == [("slow", "generate", "r1")]
    assert abs(late[0][1].deadline - late[0][1].since - 0.05) < 1e-9
    assert calls.overdue() == [] and not calls.has("generate") and calls.has("learn")
    calls.drop("learn", "admit")
    assert not calls.has("learn") and not calls.has("admit") and not calls.knows("fine")


class _StubActor:
    class pid:  # noqa: N801  the one remote method the fleet calls on start
        @staticmethod
        def remote():
            return None


def test_work_rotates_over_every_actor_when_admission_holds_fewer_requests_than_the_fleet_takes():
    """One request at a time on three idle actors: each gets its turn (an actor added by launch.scale too),
    not always the lowest-numbered one."""
    from launch.fleet import RolloutFleet

    fleet = RolloutFleet(lambda gid, placement: _StubActor(), max_failures=3)
    fleet.scale_to(3)
    for slot in fleet.slots.values():
        slot.state = "idle"
    assert fleet.places(2) == [0, 1, 2, 0, 1, 2]  # every actor's first queue place before anyone's second
    order = []
    for _ in range(6):
        i = fleet.places(2)[0]
        fleet.busy(i)
        fleet.on_success(i, version=0, offered_version=0)
        order.append(i)
    assert order == [0, 1, 2, 0, 1, 2]
    fleet.busy(0)
    assert fleet.places(2)[:2] == [1, 2]  # less loaded first
    assert 0 not in fleet.places(2, drain_one=True)  # draining for an evaluation
