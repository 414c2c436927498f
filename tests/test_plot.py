"""What `launch.plot` draws: eval points over the training reward, fleet and timing panels, readable staleness."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt

from launch.plot import PANELS, _draw, load_rows, plot_run


def _rows(steps: int = 40) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "reward_mean": s / steps, "response_length_mean": 3.0, "entropy_mean": 0.5,
                     "kl_to_ref": 0.01 * s, "staleness_mean": 1.0, "staleness_max": 1.0, "samples_per_s": 500.0,
                     "tokens_per_s": 1500.0, "learner_step_s": 0.2, "weight_sync_s": 0.01, "weight_load_s": 0.05,
                     "rollout_actors": 2 if s < 20 else 3, "actor_restarts": 0 if s < 30 else 1})
        if s % 10 == 0:
            rows.append({"step": s, "eval/reward_mean": 0.1 * s / 10, "eval/response_length_mean": 2.0,
                         "eval/policy_version": s - 1})
    return rows


def _lines(stem: str, rows: list[dict]) -> dict[str, object]:
    panel = next(p for p in PANELS if p.stem == stem)
    fig, ax = plt.subplots()
    assert _draw(ax, rows, panel)
    axes = [ax, *[a for a in fig.axes if a is not ax]]
    lines = {line.get_label(): line for a in axes for line in a.get_lines() if not line.get_label().startswith("_")}
    plt.close(fig)
    return lines


def test_eval_reward_is_drawn_at_its_own_steps_over_the_training_reward():
    lines = _lines("reward", _rows())
    ev = lines["held-out, greedy (eval)"]
    assert list(ev.get_xdata()) == [10, 20, 30, 40] and list(ev.get_ydata()) == [0.1, 0.2, 0.3, 0.4]
    assert ev.get_marker() == "o"  # sparse points stay visible
    train = next(v for k, v in lines.items() if k.startswith("sampled (train)"))
    assert len(train.get_xdata()) == 40  # eval lines are not training steps


def test_staleness_max_does_not_hide_the_mean_and_fleet_counts_are_integers():
    lines = _lines("staleness", _rows())
    assert lines["max"].get_linestyle() == "--" and lines["mean"].get_linestyle() == "-"
    fleet = _lines("fleet", _rows())
    assert list(fleet["rollout actors"].get_ydata())[18:21] == [2, 3, 3]
    assert max(fleet["actor restarts (total)"].get_ydata()) == 1


def test_throughput_puts_tokens_on_a_second_axis():
    panel = next(p for p in PANELS if p.stem == "throughput")
    fig, ax = plt.subplots()
    _draw(ax, _rows(), panel)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "tokens / s" and ax.get_ylabel() == "samples / s"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["samples/s (rolling 2)", "tokens/s (rolling 2)"]
    plt.close(fig)


def test_plot_run_writes_every_panel_and_keeps_eval_only_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    assert len(load_rows(tmp_path / "metrics.jsonl")) == 44
    names = {p.name for p in plot_run(tmp_path)}
    assert names == {f"{p.stem}.png" for p in PANELS} | {"overview.png"}
