"""The generator's vLLM engine against transformers: behaviour log-probs, weight updates, prefix cache, and the
prompt ids evaluation and training hand the engine."""
from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bos_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model, whose tokenizer now puts a BOS before every text it encodes by default (as Llama's does),
    so a prompt encoded with the tokenizer's defaults differs from the one training samples from."""
    from tokenizers import Tokenizer, processors

    out = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_model_dir, out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos = ("<|pad|>", tok.token_to_id("<|pad|>"))
    tok.post_processor = processors.TemplateProcessing(single="<|pad|> $A", pair="<|pad|> $A $B", special_tokens=[bos])
    tok.save(str(out / "tokenizer.json"))
    return str(out)


@pytest.fixture(scope="module")
def generator(bos_model_dir):
    from actors.config import ActorConfig
    from actors.generator import Generator

    return Generator(ActorConfig(n=4, max_tokens=6, temperature=0.8, top_k=0), bos_model_dir, "test-gen", max_model_len=64)


def _hf_logprobs(model, rows, temperature: float) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r.token_ids])
            logits = model(input_ids=ids).logits[0, :-1] / temperature  # (L-1, V)
            logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(logp[r.prompt_len - 1 :].float())
    return out


def _check_match(generator, model, prompts, tol: float):
    from buffer.schema import rollouts_from_arrow

    rows = rollouts_from_arrow(generator.generate(prompts).batch)
    assert len(rows) == 4 * len(prompts)
    ref = _hf_logprobs(model, rows, generator.cfg.temperature)
    worst = max(float((torch.tensor(r.behaviour_logprobs) - h).abs().max()) for r, h in zip(rows, ref))
    assert worst < tol, f"behaviour log-probs differ from transformers by {worst}"
    return rows


def test_behaviour_logprobs_match_transformers_and_follow_weight_updates(generator, tiny_model_dir):
    """vLLM's processed log-probs are the tempered distribution actually sampled; after a weight update
    they follow the new weights (prefix cache reset), within float32 tolerance."""
    from transformers import AutoModelForCausalLM

    from actors.generator import Prompt

    prompts = [Prompt(f"p{i}", f"{i}+{i}=", str(2 * i)) for i in range(4)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = _check_match(generator, model, prompts, tol=1e-4)
    assert {r.policy_version for r in rows} == {0}
    assert len({r.group_id for r in rows}) == 4 and all(r.group_size == 4 for r in rows)

    # new weights, same prompts: the prompts' KV blocks are cached from the old weights and must not be reused
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = dict(model.state_dict())
    generator.load_weights(7, iter(state.items()))
    rows = _check_match(generator, model, prompts, tol=1e-4)
    assert {r.policy_version for r in rows} == {7}


def test_skips_prompts_longer_than_the_context(generator):
    from actors.generator import Prompt

    res = generator.generate([Prompt("long", "1+" * 40 + "1=", "41", data_source="sums"),
                              Prompt("ok", "1+1=", "2", data_source="arith")])
    assert res.skipped == {"prompt_too_long": 1} and res.groups == 1
    assert res.skipped_by_source == {"sums": 1}  # data.sources' skipped_by_source/<source>


def test_evaluation_hands_the_engine_the_prompt_ids_training_does(generator, monkeypatch):
    """Held-out reward measures the policy on the prompts it is trained on: evaluation and training encode a
    prompt to the same ids, as the engine itself reports them (not the tokenizer's defaults, which add a BOS)."""
    from actors.generator import Prompt

    seen: list[list[list[int]]] = []  # per engine call, the prompt ids vLLM returned with its outputs
    sample = generator.engine.sample

    def recording(token_prompts, params):
        outs = sample(token_prompts, params)
        seen.append([list(o.prompt_token_ids) for o in outs])
        return outs

    monkeypatch.setattr(generator.engine, "sample", recording)
    prompts = [Prompt("a", "1+2=", "3", data_source="x"), Prompt("b", "4+0=", "4", data_source="y")]
    generator.generate(prompts)
    metrics = generator.evaluate(prompts)
    trained, evaluated = seen
    assert metrics["eval/reward_mean"] == (metrics["eval/reward_mean/x"] + metrics["eval/reward_mean/y"]) / 2
    assert evaluated == trained == [generator.encode(p) for p in prompts]
    assert generator.engine.tokenizer(prompts[0].text)["input_ids"] != trained[0], "the tokenizer's defaults add nothing here"


def test_chat_prompts_are_stored_as_rendered_with_their_source_and_decoded_samples(generator):
    """A chat prompt reaches the engine as the chat template renders it; those ids are what the Rollout stores,
    tagged with the row's data_source; the samples a request hands back decode the prompt template included."""
    from actors.generator import Prompt
    from buffer.schema import rollouts_from_arrow

    chat = [{"role": "user", "content": "1+2="}]  # the tiny tokenizer knows the arithmetic task's characters only
    prompts = [Prompt("c", "1+2=", "3", messages=chat, data_source="chat"), Prompt("t", "2+2=", "4")]
    res = generator.generate(prompts)
    rows = rollouts_from_arrow(res.batch)
    tok = generator.engine.tokenizer
    want = tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    chat_rows = [r for r in rows if r.prompt_id == "c"]
    assert len(chat_rows) == 4 and all(r.token_ids[:r.prompt_len] == want for r in chat_rows)
    assert {r.data_source for r in rows} == {"chat", ""}
    sample = res.samples[0]
    assert sample["prompt"] == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    assert (sample["answer"], sample["source"], sample["policy_version"]) == ("3", "chat", generator.version)
    assert sample["response"] == chat_rows[0].response_text and sample["reward"] == chat_rows[0].reward


# Last in this file: it builds and closes its own engines, and closing an in-process vLLM engine tears down the
# process's model-parallel groups, which the module's `generator` fixture still needs.
@pytest.fixture(scope="module")
def untrained_model_dir(tmp_path_factory) -> str:
    """The tiny model without its warm start: near-uniform over its 14 tokens, so responses run long enough to
    meet a two-token stop string, a stop token, EOS and the length limit."""
    from launch.config import ModelConfig
    from launch.model import build_default_model

    return build_default_model(ModelConfig(warm_start_steps=0), max_operand=4, cache_dir=tmp_path_factory.mktemp("raw"))


def test_responses_decoded_in_one_batch_spell_what_vllms_detokenizer_spells(untrained_model_dir):
    """Without stop strings vLLM does not detokenize (SamplingParams.detokenize False) and the engine decodes each
    finished response in one batch: the texts are the ones vLLM's own detokenizer gives the same tokens, special
    tokens skipped (an untrained model; one sampling seed, so both runs sample the same tokens; answers of every
    length)."""
    from actors.config import ActorConfig
    from actors.generator import Generator, Prompt

    gen = Generator(ActorConfig(n=4, max_tokens=16), untrained_model_dir, "detok-gen", max_model_len=64)
    params = gen.sampling_params()
    assert params.detokenize is False
    params.seed = 7
    ids = gen.encode_all([Prompt(f"p{i}", f"{i}+{j}=", "") for i in range(5) for j in range(5)])
    ours = [c for o in gen.engine.sample(ids, params) for c in o.outputs]
    detokenizing = params.clone()
    detokenizing.detokenize = True
    theirs = [c for o in gen.engine.sample(ids, detokenizing) for c in o.outputs]
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert len({c.text for c in ours}) > 5 and any(gen.engine.tokenizer.eos_token_id in c.token_ids for c in ours)
    assert [c.logprobs for c in ours] == [c.logprobs for c in theirs]


@pytest.mark.parametrize("mode", ["between_batches", "in_flight"])
def test_stop_strings_and_stop_ids_end_generation_with_the_sampled_tokens(untrained_model_dir, mode):
    """A response ends at the first stop string or stop token; the Rollout keeps exactly the tokens the engine
    sampled, stop tokens included, with their log-probs (checked against transformers), and its text is what
    those tokens spell (the stop string kept), so the reward and the learner see the same response. Both engines
    (the in-flight one streams deltas, with a weight version per token)."""
    import gc
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from actors.config import ActorConfig
    from actors.generator import Generator, Prompt
    from buffer.schema import rollouts_from_arrow

    gen = Generator(ActorConfig(n=8, max_tokens=16, temperature=0.9, stop=["+"], weight_update_mode=mode), untrained_model_dir,
                    "stop-gen", max_model_len=64)
    tok = gen.engine.tokenizer
    eq, eos = tok.convert_tokens_to_ids("="), tok.eos_token_id
    gen.cfg = gen.cfg.model_copy(update={"stop_token_ids": [eq]})  # read per request: no second engine needed
    rows = rollouts_from_arrow(gen.generate([Prompt(f"p{i}", f"{i}+{j}=", str(i + j)) for i in range(4) for j in range(2)]).batch)
    ends = Counter()
    for r in rows:
        resp = r.token_ids[r.prompt_len:]
        assert len(r.behaviour_logprobs) == len(resp)
        assert len(r.token_versions) == len(resp) or mode == "between_batches"  # a version per kept token
        assert r.response_text == tok.decode(resp, skip_special_tokens=True)  # text and tokens agree
        assert eq not in resp[:-1] and eos not in resp[:-1] and "+" not in tok.decode(resp[:-1])  # the first stop ends it
        if resp[-1] == eq:
            ends["stop_token_id"] += 1
        elif resp[-1] == eos:
            ends["eos"] += 1
        elif r.response_text.endswith("+"):
            ends["stop_string"] += 1
        else:
            assert len(resp) == 16 and r.finish_reason == "length"
            ends["length"] += 1
            continue
        assert r.finish_reason == "stop"
    assert ends["stop_token_id"] and ends["stop_string"] and ends["eos"], ends
    model = AutoModelForCausalLM.from_pretrained(untrained_model_dir, dtype=torch.float32).eval()
    worst = max(float((torch.tensor(r.behaviour_logprobs) - h).abs().max())
                for r, h in zip(rows, _hf_logprobs(model, rows, 0.9)))
    assert worst < 1e-4, f"behaviour log-probs of stopped responses differ from transformers by {worst}"
    gen.close()
    del gen
    gc.collect()
