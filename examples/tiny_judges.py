"""The tiny judges against the truth: build time, accuracy on fresh responses, and on the tiny policy's own samples.

Builds (or reuses) the scalar and preference judges of launch/judges.py and the warm-started tiny policy of
launch/model.py for synthetic:arithmetic with operands up to --max_operand, samples the policy at temperature 1
(plain `a+b=` prompts, as the default job renders them) and asks: does the scalar judge score a right sample above
a wrong one (AUC; accuracy of `score > 0` against actors.rewards.arithmetic), and does the preference judge prefer
the right sample of a group over a wrong one? Prints one JSON object.

    python -m examples.tiny_judges                        # max_operand 4, a 30-step warm start (the tests' policy)
    python -m examples.tiny_judges --max_operand 9 --warm_start_steps 200   # the default job's policy
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from actors.judge_format import encode, scalar_messages
from actors.rewards import arithmetic_reward
from launch.config import ModelConfig
from launch.judges import KINDS, JudgeRecipe, auc, build_tiny_judge, evaluate, logits, preferences
from launch.model import build_default_model


@torch.no_grad()
def policy_samples(model_dir: str, problems: list[tuple[int, int]], per_prompt: int,
                   seed: int) -> list[tuple[int, int, str]]:
    """(a, b, response) for `per_prompt` samples of the causal LM in `model_dir` on each plain `a+b=` prompt."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    out = []
    for a, b in problems:
        ids = torch.tensor([tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"]] * per_prompt)  # (n, P)
        gen = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                              max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out += [(a, b, tok.decode(g[ids.shape[1]:], skip_special_tokens=True)) for g in gen]  # g: (P + T,)
    return out


def _chat(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"{a}+{b}="}]


def on_policy(judges: dict[str, str], samples: list[tuple[int, int, str]]) -> dict:
    """How the judges rank the policy's samples against arithmetic correctness."""
    right = [arithmetic_reward(r, str(a + b)) > 0 for a, b, r in samples]
    model, tok = (AutoModelForSequenceClassification.from_pretrained(judges["scalar"]),
                  AutoTokenizer.from_pretrained(judges["scalar"]))
    z = logits(model, [encode(tok, scalar_messages(_chat(a, b), r)) for a, b, r in samples], tok.pad_token_id)
    pos, neg = [s for s, ok in zip(z, right) if ok], [s for s, ok in zip(z, right) if not ok]
    pairs = [(r, w, _chat(a, b)) for (a, b, r), ok in zip(samples, right) if ok
             for (a2, b2, w), ok2 in zip(samples, right) if (a2, b2) == (a, b) and not ok2]
    pmodel, ptok = (AutoModelForSequenceClassification.from_pretrained(judges["preference"]),
                    AutoTokenizer.from_pretrained(judges["preference"]))
    p = preferences(pmodel, ptok, pairs)
    return {"samples": len(samples), "right": len(pos), "wrong": len(neg),
            "distinct_wrong": len({r for (a, b, r), ok in zip(samples, right) if not ok}),
            "scalar_auc": auc(pos, neg) if pos and neg else None,
            "scalar_accuracy": sum((s > 0) == ok for s, ok in zip(z, right)) / len(z),
            "scalar_mean_right": sum(pos) / max(len(pos), 1), "scalar_mean_wrong": sum(neg) / max(len(neg), 1),
            "preference_pairs": len(p), "preference_accuracy": sum(x > 0.5 for x in p) / max(len(p), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_operand", type=int, default=4)
    parser.add_argument("--warm_start_steps", type=int, default=30)
    parser.add_argument("--per_prompt", type=int, default=8)
    parser.add_argument("--cache", default=None, help="where builds are kept (default: a fresh temporary folder)")
    args = parser.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="relay-judges-")
    recipe = JudgeRecipe.for_task(args.max_operand)  # what launch builds when a reward model's path is omitted
    problems = [(a, b) for a in range(args.max_operand + 1) for b in range(args.max_operand + 1)]
    report: dict = {"max_operand": args.max_operand, "torch_threads": torch.get_num_threads()}
    judges = {}
    for kind in KINDS:
        start = time.perf_counter()
        judges[kind] = build_tiny_judge(kind, cache, recipe)
        record = json.loads(open(f"{judges[kind]}/relay_judge.json").read())
        model = AutoModelForSequenceClassification.from_pretrained(judges[kind])
        tok = AutoTokenizer.from_pretrained(judges[kind])
        report[kind] = {"build_s": record["build_seconds"], "build_cpu_s": record["build_cpu_seconds"],
                        "call_s": time.perf_counter() - start,
                        "held_out": evaluate(model, tok, kind, problems, seed=12345, per_problem=8)}
    policy = build_default_model(ModelConfig(warm_start_steps=args.warm_start_steps), args.max_operand, cache)
    report["on_policy"] = on_policy(judges, policy_samples(policy, problems, args.per_prompt, seed=0))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
