"""Prompt data and its one rendering: every file format, field names, counted skips, chat templates, the checks
that refuse unusable data before any actor starts."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.prompts import Prompt, PromptFormat, render_all
from launch.config import ConfigError, DataConfig, load_config
from launch.data import DataError, load_prompts, render_prompts
from launch.run_data import prepare_prompts
from launch.model import CHAT_TEMPLATE, train_tokenizer

ROWS = [
    {"id": "a", "prompt": "1+2=", "answer": 3, "data_source": "arith", "level": 1},
    {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
     "answer": "4", "data_source": "chat"},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([f"{a}+{b}={a + b}" for a in range(10) for b in range(10)], vocab_size=64, alphabet="ascii")


def _check_rows(ps):
    a, b = ps.prompts
    assert (a.id, a.text, a.answer, a.messages, a.data_source, a.metadata) == ("a", "1+2=", "3", None, "arith", {"level": 1})
    assert b.messages[1] == {"role": "user", "content": "What is 2+2?"} and b.text == "What is 2+2?"
    assert b.data_source == "chat" and b.answer == "4"


def test_every_file_format_reads_the_same_rows(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist([{"messages": None, "prompt": None, **r, "answer": str(r["answer"]), "level": r.get("level")} for r in ROWS]), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json"):
        _check_rows(load_prompts(str(tmp_path / name)))
    # parquet gives every row every column (None where absent): a null `messages` is no chat, a null field stays metadata
    a, b = load_prompts(str(tmp_path / "d.parquet")).prompts
    assert a.messages is None and a.text == "1+2=" and b.messages[1]["content"] == "What is 2+2?"
    # a `datasets` source: a directory of data files (load_dataset picks the builder), and a builder with load_kwargs
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    a, b = load_prompts(str(tmp_path / "dir")).prompts
    assert a.id == "a" and b.messages[0]["role"] == "system"
    ps = load_prompts("json", DataConfig(load_kwargs={"data_files": {"train": str(tmp_path / "d.jsonl")}}))
    assert [p.id for p in ps.prompts] == ["a", "b"]


def test_field_names_nested_keys_and_verl_layout(tmp_path):
    # GSM8K's own columns, and verl's parquet layout (the chat under `prompt`, the answer nested)
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "Tom has 3+4 apples?", "answer": "3+4=7\n#### 7", "uid": 9, "src": "gsm8k"}) + "\n")
    p, = load_prompts(str(f), DataConfig(prompt_key="question", id_key="uid", source_key="src")).prompts
    assert (p.id, p.text, p.answer, p.data_source, p.metadata) == ("9", "Tom has 3+4 apples?", "3+4=7\n#### 7", "gsm8k", {})
    v = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist([{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "1+1?"}],
                                          "reward_model": {"ground_truth": "2", "style": "rule"}}]), v)
    p, = load_prompts(str(v), DataConfig(answer_key="reward_model.ground_truth")).prompts
    assert p.messages == [{"role": "user", "content": "1+1?"}] and p.answer == "2" and p.data_source == "openai/gsm8k"


def test_malformed_rows_are_counted_by_reason_and_an_unusable_source_names_them(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "1+1=", "answer": "2"}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"answer": "2"}),
        json.dumps({"prompt": "  ", "answer": "2"}),
        json.dumps({"prompt": 5, "answer": "2"}),
        json.dumps({"messages": [{"role": "user"}], "answer": "1"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "answer": "1"}),
        json.dumps({"prompt": "2+2="}),
    ]) + "\n")
    ps = load_prompts(str(f))
    assert len(ps.prompts) == 1
    assert ps.skipped == {"bad_json": 1, "not_an_object": 1, "missing_prompt": 1, "bad_prompt": 2, "bad_messages": 2,
                          "missing_answer": 1}
    assert len(load_prompts(str(f), DataConfig(require_answer=False)).prompts) == 2  # the answerless row is kept
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable rows.*missing_prompt.*'prompt'"):
        load_prompts(str(empty))
    with pytest.raises(DataError, match="no such file"):
        load_prompts(str(tmp_path / "nope.parquet"))


def test_render_is_the_chat_template_with_a_generation_prompt(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    chat = Prompt("c", "What is 2+2?", "4", messages=[{"role": "user", "content": "What is 2+2?"}])
    text = Prompt("t", "2+2=", "4")
    ids = render_all(tok, [chat, text])
    assert ids[0] == tok.apply_chat_template(chat.messages, add_generation_prompt=True)["input_ids"]
    # auto: a text prompt goes through the template too when the tokenizer has one
    assert ids[1] == tok.apply_chat_template([{"role": "user", "content": "2+2="}], add_generation_prompt=True)["input_ids"]
    assert tok.decode(ids[1]) == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n"
    raw = render_all(tok, [text], PromptFormat(apply_chat_template=False))[0]
    assert raw == tok("2+2=", add_special_tokens=False)["input_ids"]
    sys_ids = render_all(tok, [chat], PromptFormat(system_prompt="Be brief."))[0]
    assert tok.decode(sys_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is")
    stored = Prompt("s", "x", "", token_ids=[7, 8])  # a stored rendering is what the engine gets, untouched
    assert render_all(tok, [stored, text]) == [[7, 8], ids[1]]


def test_chat_data_needs_a_template_and_max_prompt_len_skips_are_counted(tok, tmp_path):
    plain = train_tokenizer(["1+1=2"], vocab_size=64)
    plain.chat_template = None
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": c}], "answer": "1"}) + "\n"
                         for c in ("1+1?", "What is 1+1? Think step by step, then answer.")))
    ps = load_prompts(str(f))
    with pytest.raises(DataError, match="chat.jsonl: 2 rows are chats.*no chat template"):
        render_prompts(ps, plain, PromptFormat(), 64, str(f))
    with pytest.raises(DataError, match="system_prompt needs a chat template"):
        render_prompts(load_prompts("synthetic:arithmetic"), plain, PromptFormat(system_prompt="hi"), 64, "synthetic")
    short = len(render_all(tok, ps.prompts[:1])[0])
    kept = render_prompts(ps, tok, PromptFormat(), short, str(f))
    assert [p.text for p in kept.prompts] == ["1+1?"] and kept.skipped == {"prompt_too_long": 1}
    assert kept.prompts[0].token_ids == render_all(tok, ps.prompts[:1])[0]
    with pytest.raises(DataError, match="no row fits.*prompt_too_long"):
        render_prompts(ps, tok, PromptFormat(), short - 1, str(f))


def test_prepare_prompts_checks_routes_and_lengths(tmp_path, tiny_model_dir):
    from actors.rewards import Rewards

    f = tmp_path / "mixed.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = load_config(None, {"data.train": str(f), "data.max_prompt_len": 12, "model.path": tiny_model_dir})
    data = prepare_prompts(cfg, tiny_model_dir, Rewards({"arith": "arithmetic", "chat": "math_verify"}))
    assert [p.id for p in data.train.prompts] == ["a"] and data.train.skipped == {"prompt_too_long": 1}
    with pytest.raises(DataError, match=r"no reward for data_source \['chat'\]"):
        prepare_prompts(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_prompt_len": None})}),
                        tiny_model_dir, Rewards({"arith": "arithmetic"}))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'data.max_prompt_len': 60 \\+ actors.max_tokens=8 exceeds model.max_model_len=64"):
        load_config(None, {"data.max_prompt_len": 60})
    with pytest.raises(ConfigError, match="'data.train': dataset file ./nope.jsonl does not exist"):
        load_config(None, {"data.train": "./nope.jsonl"})
    load_config(None, {"data.train": "openai/gsm8k"})  # a hub name: resolved by datasets when the run starts
    with pytest.raises(ConfigError, match="'actors.reward'.*nope.py does not exist"):
        load_config(None, {"actors.reward": {"gsm8k": "math_verify", "default": "nope.py:fn"}})
    with pytest.raises(ConfigError, match="unknown config key 'data.prompt_field'"):
        load_config(None, {"data.prompt_field": "q"})


def test_samples_jsonl_and_tensorboard_text_every_k_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch.metrics import MetricsLog

    log = MetricsLog(tmp_path, total_steps=4, tensorboard=True, progress=False, samples=(2, 2))
    rows = [{"prompt": f"<|im_start|>user\n{i}+1=<|im_end|>\n", "response": str(i + 1), "reward": 1.0, "answer": str(i + 1),
             "source": "arith", "policy_version": i, "prompt_id": f"p{i}"} for i in range(3)]
    log.keep_samples(rows)
    for step in (1, 2):
        log.log({"step": step, "policy_version": step, "reward_mean": 0.5})
    log.keep_samples(rows[:1])
    log.log({"step": 3, "policy_version": 3, "reward_mean": 0.5})
    log.close()
    written = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt_id"]) for s in written] == [(2, "p1"), (2, "p2")]  # the newest 2, at step 2 only
    assert written[0]["prompt"] == rows[1]["prompt"] and written[0]["policy_version"] == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [2] and b"2+1=" in texts[0].tensor_proto.string_val[0]
