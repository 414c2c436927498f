"""LoRA adapters a generator serves on its base model: what a whole adapter is, and the files vLLM reads.

Why checked here, before vLLM sees anything: vLLM's LoRA loader reads a PEFT directory (adapter_config.json +
adapter_model.safetensors; vLLM 0.32 has no in-memory path through `LoRARequest`), and a bad file found while it
loads lazily, inside a generation step, leaves the in-process engine hung (a truncated file raises SafetensorError
from `generate`, then the next step never returns). So a version's tensors are checked whole against the base
model first: every expected `lora_A` / `lora_B` present with its shape, nothing else, every value finite. Only
then are they written (to a private directory, renamed into place) and loaded with an explicit `add_lora`, which
raises instead of hanging and loads a new adapter before it evicts the old one.

What "expected" means comes from the base checkpoint itself (its safetensors headers), not from the adapter: each
2-D weight of a module the config's target_modules names (PEFT's rule: the name, or a suffix after a dot) needs
A (r, in) and B (out, r) under PEFT's saved names `base_model.model.<module>.lora_{A,B}.weight`.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

PREFIX = "base_model.model."  # PEFT's prefix of a causal LM's module names in adapter_model.safetensors
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's LoRAConfig.max_lora_rank choices (MaxLoRARanks)


class AdapterError(ValueError):
    """A version's adapter is not whole (missing, extra or misshapen tensors, non-finite values, a bad config)."""


def vllm_max_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds adapters of `rank`."""
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"learner.lora.rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


def base_shapes(model_path: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the base checkpoint's 2-D tensors, read from the safetensors headers only."""
    from safetensors import safe_open

    directory = model_path
    if not os.path.isdir(directory):  # a hub name: the copy vLLM loaded from the cache
        from huggingface_hub import snapshot_download

        directory = snapshot_download(model_path, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    shapes = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                if len(shape) == 2:
                    shapes[name] = shape
    if not shapes:
        raise AdapterError(f"{model_path}: no safetensors weights to check adapters against")
    return shapes


def expected_tensors(shapes: dict[str, tuple[int, ...]], config: dict) -> dict[str, tuple[int, int]]:
    """{PEFT saved name: shape} of every tensor a whole adapter with `config` holds on the base model `shapes`."""
    r, targets = int(config.get("r", 0)), config.get("target_modules")
    if r <= 0 or not targets:
        raise AdapterError(f"adapter config: r={config.get('r')!r}, target_modules={targets!r}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    out = {}
    for name, (rows, cols) in shapes.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and any(module == t or module.endswith("." + t) for t in targets):
            out[f"{PREFIX}{module}.lora_A.weight"] = (r, cols)  # A: (r, in)
            out[f"{PREFIX}{module}.lora_B.weight"] = (rows, r)  # B: (out, r)
    if not out:
        raise AdapterError(f"adapter config: target_modules {targets} name no weight of the base model")
    return out


def check_whole(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, int]], what: str) -> None:
    """Raise AdapterError naming what is wrong unless `tensors` is exactly `expected`, with finite values."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if tuple(tensors[n].shape) != expected[n])
    if missing or extra or wrong:
        raise AdapterError(
            f"{what}: not a whole adapter for this model ({len(missing)} missing, e.g. {missing[:2]}; {len(extra)} "
            f"unexpected, e.g. {extra[:2]}; {len(wrong)} misshapen, e.g. "
            f"{[(n, tuple(tensors[n].shape), expected[n]) for n in wrong[:2]]})")
    bad = [n for n, t in tensors.items() if not (t.is_floating_point() and bool(torch.isfinite(t).all()))]
    if bad:
        raise AdapterError(f"{what}: {len(bad)} tensor(s) not finite floating point, e.g. {bad[:2]}")


def write_dir(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """A PEFT adapter directory (what vLLM's LoRARequest and PeftModel.from_pretrained read), renamed into place."""
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(tmp / WEIGHTS))
    (tmp / CONFIG).write_text(json.dumps(config))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return str(directory)


def read_dir(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a PEFT adapter directory, e.g. a checkpoint's `model/adapter/`."""
    from safetensors.torch import load_file

    path = Path(directory)
    try:
        return load_file(str(path / WEIGHTS)), json.loads((path / CONFIG).read_text())
    except Exception as exc:  # a missing or damaged file: the same refusal as a damaged transfer
        raise AdapterError(f"adapter {directory}: cannot be read ({type(exc).__name__}: {exc})") from None



class AdapterSlot:
    """A generator's LoRA side: the engine arguments that enable it, the base model's shapes every version is checked
    against, and a private directory where each version's files are written before vLLM loads them (the previous
    version's files go once the new one is served: vLLM holds a served adapter in memory)."""

    def __init__(self, model_path: str, rank: int, generator_id: str):
        self.model_path, self.max_rank, self.id = model_path, vllm_max_rank(rank), generator_id
        self.root = Path(tempfile.mkdtemp(prefix=f"relay-lora-{generator_id}-"))
        self._shapes: dict[str, tuple[int, ...]] | None = None  # read on the first adapter
        self._serving: str | None = None
        self._loads = itertools.count()  # a fresh path per load, even of a version loaded before

    def engine_args(self) -> dict:
        """vLLM's LoRA layers for one adapter at a time (the served version's), of up to the learner's rank."""
        return {"enable_lora": True, "max_lora_rank": self.max_rank, "max_loras": 1}

    def prepare(self, version: int, tensors: dict[str, torch.Tensor], config: dict) -> str:
        """The directory vLLM loads version `version` from, written only once the tensors are a whole adapter."""
        what = f"generator {self.id}: adapter version {version}"
        if int(config.get("r", 0)) > self.max_rank:
            raise AdapterError(f"{what}: rank {config.get('r')} exceeds the engine's max_lora_rank {self.max_rank}")
        if self._shapes is None:
            self._shapes = base_shapes(self.model_path)
        check_whole(tensors, expected_tensors(self._shapes, config), what)
        return write_dir(self.root / f"v{version}-{next(self._loads)}", tensors, config)

    def served(self, directory: str) -> None:
        old, self._serving = self._serving, directory
        if old is not None and old != directory:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
