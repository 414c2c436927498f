"""`python -m launch.export RUN_DIR OUT.parquet [--tokenizer DIR]`: every rollout a run stored, as offline data.

"Every stored rollout" is every group the replay buffer accepted during the run (not dropped stale at put, not
filtered by `buffer.filter`), also those long gone from it: the buffer appends each one to the run's rollout log
(`RUN_DIR/rollouts/`, see buffer/rollout_log.py; on by default, `buffer.rollout_log`). A resumed run's log holds
each group once: groups logged after the checkpoint it resumed from were rolled back, as their requests were
generated again.

The Parquet file has every ROLLOUT_SCHEMA column (token ids, behaviour log-probs, per-token versions, reward,
generator_id, data_source, ...) plus `prompt_ids`, `response_ids` and `prompt_text` (decoded with the run's
tokenizer, special tokens kept: the exact text the model saw), and `relay.schema_version` in its metadata.
It loads back with buffer/offline.py (`read_offline`, `ReplayBuffer.load_offline`) bit-exact.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from buffer.rollout_log import read_log
from buffer.schema import ROLLOUT_SCHEMA, SCHEMA_VERSION

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


class ExportError(ValueError):
    """The run cannot be exported; the message names the directory or file."""


def export(run_dir: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> dict:
    """Write the run's stored rollouts to `out`; returns what was written (rows, groups, tokenizer)."""
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist")
    config = _run_config(run_dir)
    log_dir = run_dir / "rollouts"
    if not log_dir.is_dir():
        why = ("buffer.rollout_log is false in its config.yaml" if config.get("buffer", {}).get("rollout_log") is False
               else "the buffer stored nothing, or the run predates the rollout log")
        raise ExportError(f"run {run_dir} has no rollout log ({log_dir} missing): {why}")
    table = read_log(str(log_dir))
    if table.num_rows == 0:
        raise ExportError(f"run {run_dir} stored no rollouts ({log_dir} holds no complete group)")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else find_tokenizer(run_dir, config)
    table = with_decoded_prompts(table, _load_tokenizer(tok_dir))
    meta = {"relay.schema_version": str(SCHEMA_VERSION), "relay.run_dir": str(run_dir.resolve()),
            "relay.tokenizer": str(tok_dir), "relay.exported_by": "launch.export"}
    table = table.replace_schema_metadata(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)  # a half-written export never carries the final name
    groups = len(set(table.column("group_id").to_pylist()))
    return {"path": str(out), "rows": table.num_rows, "groups": groups, "tokenizer": str(tok_dir)}


def with_decoded_prompts(table: pa.Table, tokenizer) -> pa.Table:
    """ROLLOUT_SCHEMA columns plus prompt_ids, response_ids (int32 lists) and prompt_text."""
    ids = table.column("token_ids").to_pylist()
    plens = table.column("prompt_len").to_pylist()
    prompts = [t[:n] for t, n in zip(ids, plens)]
    extra = {
        "prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
        "response_ids": pa.array([t[n:] for t, n in zip(ids, plens)], pa.list_(pa.int32())),
        "prompt_text": pa.array(tokenizer.batch_decode(prompts, skip_special_tokens=False), pa.string()),
    }
    table = table.select([f.name for f in ROLLOUT_SCHEMA])
    for name, column in extra.items():
        table = table.append_column(name, column)
    return table


def find_tokenizer(run_dir: Path, config: dict) -> Path:
    """The run's tokenizer: its final weights, its newest checkpoint, the configured model, or the default
    model the run built (in that order; every one carries the tokenizer the generators used)."""
    candidates = [run_dir / "final"]
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        candidates.append(run_dir / "checkpoints" / latest.read_text().strip() / "model")
    model = config.get("model", {})
    if model.get("path"):
        candidates.append(Path(model["path"]).expanduser())
    else:
        from launch.config import DataConfig, ModelConfig
        from launch.data import prompt_format
        from launch.model import default_model_dir

        data = DataConfig(**config.get("data", {}))
        cache = Path(config.get("output_dir", "runs")) / "_models"
        candidates.append(default_model_dir(ModelConfig(**model), data.max_operand, cache, prompt_format(data)))
    for path in candidates:
        if any((path / name).is_file() for name in TOKENIZER_MARKERS):
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise ExportError(f"run {run_dir}: no tokenizer found (tried {tried}); pass --tokenizer DIR")


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run directory: {path} is missing")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ExportError(f"{path}: not valid YAML ({exc})") from exc


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"tokenizer {path} does not load: {exc}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory (made by python -m launch.train)")
    parser.add_argument("out", help="the Parquet file to write")
    parser.add_argument("--tokenizer", help="decode prompts with this tokenizer (default: the run's own)")
    args = parser.parse_args(argv)
    try:
        done = export(args.run_dir, args.out, args.tokenizer)
    except (ExportError, ValueError, FileNotFoundError) as exc:
        print(f"relay export: {exc}", file=sys.stderr)
        return 2
    print(f"relay export: {done['rows']} rollouts in {done['groups']} groups -> {done['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
