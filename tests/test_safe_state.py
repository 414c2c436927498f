"""The learner's checkpoint format: safetensors + JSON, refusing anything that would need a pickle."""
from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from safetensors import safe_open
from safetensors.torch import save_file

from learner.safe_state import TREE_KEY, UnsafeStateError, load, save


def test_round_trip_keeps_structure_values_and_shared_tensors(tmp_path):
    flat = torch.arange(12, dtype=torch.float32)
    state = OrderedDict(
        step=3, lr=1e-3, inf=float("inf"), name="x", none=None, flag=True,
        shape=torch.Size([2, 3]), dtype=torch.bfloat16, pair=(1, "a"), names={"b"},
        state={0: {"exp_avg": torch.ones(2, 3), "step": torch.tensor(4)}},  # int keys, as in optimizer state
        views=[flat[:6].view(2, 3), flat[6:], flat[:6].view(2, 3)],  # views of one flat buffer, one repeated
        rng=torch.get_rng_state(), stage=ZeroStageEnum.gradients, scaler=LossScaler(scale=8.0),
    )
    save(state, str(tmp_path / "s"))
    got = load(str(tmp_path / "s"))
    assert list(got) == list(state)
    assert (got["step"], got["lr"], got["inf"], got["name"], got["none"], got["flag"]) == (3, 1e-3, float("inf"), "x", None, True)
    assert got["shape"] == torch.Size([2, 3]) and got["dtype"] is torch.bfloat16
    assert got["pair"] == (1, "a") and got["names"] == {"b"}
    assert torch.equal(got["state"][0]["exp_avg"], torch.ones(2, 3)) and int(got["state"][0]["step"]) == 4
    assert torch.equal(got["views"][0], flat[:6].view(2, 3)) and torch.equal(got["views"][1], flat[6:])
    assert got["views"][2] is got["views"][0]  # the same view is stored once
    assert torch.equal(got["rng"], state["rng"])
    assert got["stage"] is ZeroStageEnum.gradients
    assert isinstance(got["scaler"], LossScaler) and got["scaler"].cur_scale == 8.0


def test_an_arbitrary_object_is_refused_at_save_naming_where_it_sits(tmp_path):
    class Mine:
        pass

    with pytest.raises(UnsafeStateError, match=r"state\.client\.obj: .*Mine is not a DeepSpeed type"):
        save({"client": {"obj": Mine()}}, str(tmp_path / "s"))
    with pytest.raises(UnsafeStateError, match="cannot be stored"):
        save({"f": b"raw bytes"}, str(tmp_path / "s"))


def test_load_rebuilds_only_deepspeed_types_and_never_unpickles(tmp_path):
    path = str(tmp_path / "s")
    save({"stage": ZeroStageEnum.weights}, path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tampered = meta[TREE_KEY].replace("deepspeed.runtime.zero.config:ZeroStageEnum", "os:system")
    assert tampered != meta[TREE_KEY]
    save_file({"x": torch.zeros(1)}, path, metadata={**meta, TREE_KEY: tampered})
    with pytest.raises(UnsafeStateError, match="refusing to rebuild os:system"):
        load(path)
    torch.save({"a": 1}, str(tmp_path / "pickled.pt"))
    with pytest.raises(UnsafeStateError, match="not a safetensors file .* does not unpickle"):
        load(str(tmp_path / "pickled.pt"))
    save_file({"x": torch.zeros(1)}, path, metadata={"format": "other", TREE_KEY: json.dumps({})})
    with pytest.raises(UnsafeStateError, match="format 'other'"):
        load(path)
