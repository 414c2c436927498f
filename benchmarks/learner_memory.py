"""The learner at real lengths: peak memory and tokens/s of one learner step against the straightforward path.

A Qwen2-shaped model with Qwen's 151,936-token vocabulary, built from its config (random weights, no
download), trains one step on responses of 256, 1,024 and 4,096 tokens (plus a 64-token prompt) through
Relay's `Learner` (DeepSpeed; log-probs from the response span's hidden states in chunks of tokens, the
chunk's logits rebuilt in backward; each micro-batch padded to its own longest row; `--checkpointing` adds
gradient checkpointing),
and through the straightforward path: the causal LM's full (B, L, V) logits, an fp32 log-softmax over them
and its exp for the entropy, every row padded to the step's longest, no checkpointing, torch AdamW.

Each (path, length) runs in a fresh subprocess, so its peak is its own: the process's high-water resident
memory on CPU (VmHWM; not ru_maxrss, which a subprocess inherits from the process that started it), the CUDA
allocator's peak on a GPU. Both paths take a warm-up step (the first
allocates the optimizer state) and time the second; each path runs `--repeats` times per length (2; alternating
order), medians reported. tokens/s counts the non-padding tokens of the forward
pass (prompt + response); MFU = 6 * params * tokens/s / peak FLOP/s (recomputation not counted, as usual).

Runs on torch, transformers, DeepSpeed and pydantic alone (no Ray, vLLM or pyarrow), e.g. on one GPU:

    python -m benchmarks.learner_memory --device cuda --dtype bfloat16 --model qwen3-0.6b --rows 8
    python -m benchmarks.learner_memory [--quick]          # CPU, the Qwen2-shaped bench model
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import CACHE, result, rss_gib

VOCAB = 151_936
PROMPT_LEN = 64
LENGTHS = (256, 1024, 4096)
# name: (hidden, intermediate, layers, heads, kv heads, head_dim, Qwen3?)
SHAPES = {"bench": (256, 1024, 4, 4, 2, 64, False), "quick": (64, 128, 2, 1, 1, 64, False),
          "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, True)}
H100_BF16_DENSE = 989e12  # peak FLOP/s of an H100 / H200 SXM in dense bf16


def build_model(shape: str, cache: Path = CACHE) -> str:
    """The model directory (config, random weights, a word-level tokenizer for the pad id), built once."""
    out = cache / f"learner-memory-{shape}"
    if (out / "config.json").exists():
        return str(out)
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

    hidden, inter, layers, heads, kv, head_dim, qwen3 = SHAPES[shape]
    config = (Qwen3Config if qwen3 else Qwen2Config)(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=40960,
        tie_word_embeddings=True, rope_theta=1e6, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 64)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<eos>")),
                            pad_token="<pad>", eos_token="<eos>").save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def make_batch(rows: int, length: int, prompt_len: int):
    """`rows` rows of one group: responses of length, length/2, length/4, ...; rewards alternate 1/0."""
    import torch

    from learner.batch import TrainBatch

    gen = torch.Generator().manual_seed(0)
    resp = [max(length >> min(i, 2), 1) for i in range(rows)]
    L, T = prompt_len + max(resp), max(resp)
    input_ids = torch.zeros(rows, L, dtype=torch.long)
    attention_mask = torch.zeros(rows, L, dtype=torch.long)
    resp_index = torch.zeros(rows, T, dtype=torch.long)
    resp_mask = torch.zeros(rows, T)
    for i, n in enumerate(resp):
        input_ids[i, :prompt_len + n] = torch.randint(2, VOCAB, (prompt_len + n,), generator=gen)
        attention_mask[i, :prompt_len + n] = 1
        resp_index[i, :n] = torch.arange(prompt_len - 1, prompt_len - 1 + n)
        resp_mask[i, :n] = 1.0
    zeros = torch.zeros(rows, dtype=torch.long)
    return TrainBatch(input_ids, attention_mask, resp_index, resp_mask, -2.0 * resp_mask,
                      torch.tensor([float(i % 2) for i in range(rows)]), zeros, zeros, torch.zeros_like(resp_index))


def relay_step_fn(args, model_dir: str, batch):
    from learner.config import LearnerConfig
    from learner.learner import Learner
    from learner.objectives import ObjectiveConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = LearnerConfig(groups_per_step=1, micro_batch_groups=1, num_gpus=1 if args.device == "cuda" else 0,
                        dtype=args.dtype, lr=1e-6, gradient_checkpointing=getattr(args, "checkpointing", False),
                        logprob_chunk_tokens=args.chunk_tokens,
                        max_tokens_per_micro_batch=args.micro_tokens,
                        objective=ObjectiveConfig(name="grpo"))
    learner = Learner(cfg, model_dir, group_size=len(batch), temperature=1.0)
    return lambda: learner.train_tensors(batch), learner.engine.module


def full_step_fn(args, model_dir: str, batch):
    """The straightforward step: full logits, fp32 log-softmax over (B, L, V), padding to the step's longest."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99))
    b = {k: getattr(batch, k).to(device) for k in ("input_ids", "attention_mask", "resp_index", "resp_mask", "rewards")}

    def step():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, L, V)
        logp_all = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
        logp = logp_all.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1).gather(1, b["resp_index"])  # (B, T)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, L-1)
        adv = b["rewards"] - b["rewards"].mean()  # (B,)
        mask = b["resp_mask"]
        loss = -(adv[:, None] * logp * mask).sum(-1).div(mask.sum(-1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"entropy_mean": float((entropy.gather(1, b["resp_index"]) * mask).sum() / mask.sum())}

    return step, model


def child(args) -> dict:
    """One (path, length) in this process: warm-up step, timed step, peak memory."""
    import torch

    torch.manual_seed(0)
    model_dir = build_model(args.model)
    batch = make_batch(args.rows, args.length, args.prompt_len)
    step, module = (relay_step_fn if args.path == "relay" else full_step_fn)(args, model_dir, batch)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step()
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    secs = time.perf_counter() - t0
    params = sum(p.numel() for p in module.parameters())  # tied head counted once
    tokens = int(batch.attention_mask.sum())
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would start at the high-water mark of
    # the benchmark runner that forked it (2.6-2.7 GiB after the benchmarks before it), and both paths' short steps
    # read that floor instead of their own peak
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif (hwm := rss_gib("VmHWM")) is not None:
        peak = hwm * 2**30
    else:  # no /proc (not Linux): ru_maxrss, the only mark there
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": args.path, "length": args.length, "rows": args.rows, "step_s": round(secs, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / secs, 1), "peak_gib": round(peak / 2**30, 3),
            "params": params, "mfu": float(f"{6 * params * tokens / secs / args.peak_flops:.4g}"),
            "heavy_imports": sorted({m.split(".")[0] for m in sys.modules} & {"ray", "vllm", "pyarrow"})}


def measure(model: str, lengths, rows: int, device: str = "cpu", dtype: str = "float32", extra: tuple = (),
            repeats: int = 1) -> list[dict]:
    """Per length, both paths, each in a fresh subprocess, `repeats` times in alternating order (the machines are
    shared: a neighbour's burst should not land on one path only); medians; one sample per length."""
    build_model(model)  # once, before the children race to build it
    samples = []
    for length in lengths:
        got: dict[str, list[dict]] = {"full": [], "relay": []}
        for k in range(repeats):
            for path in ("full", "relay") if k % 2 == 0 else ("relay", "full"):
                cmd = [sys.executable, "-m", "benchmarks.learner_memory", "--child", path, "--length", str(length),
                       "--rows", str(rows), "--model", model, "--device", device, "--dtype", dtype, *extra]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0:
                    raise RuntimeError(f"learner_memory {path} at {length} tokens failed: {proc.stderr[-2000:]}")
                got[path].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r, f = ({k: float(f"{statistics.median(x[k] for x in got[path]):.4g}")
                 for k in ("peak_gib", "tokens_per_s", "step_s", "mfu")}
                for path in ("relay", "full"))
        samples.append({"length": length, "rows": rows, "repeats": repeats, "relay_peak_gib": r["peak_gib"],
                        "full_peak_gib": f["peak_gib"], "memory_ratio": round(r["peak_gib"] / f["peak_gib"], 3),
                        "relay_tokens_s": r["tokens_per_s"], "full_tokens_s": f["tokens_per_s"],
                        "speed_ratio": round(r["tokens_per_s"] / f["tokens_per_s"], 3),
                        "relay_step_s": r["step_s"], "full_step_s": f["step_s"], "relay_mfu": r["mfu"],
                        "full_mfu": f["mfu"], "params": got["relay"][0]["params"],
                        "heavy_imports": sorted({m for x in got["relay"] + got["full"] for m in x["heavy_imports"]})})
        print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
    return samples


def rows_from(samples: list[dict], config: dict) -> list[dict]:
    """The two result rows, at the longest length; every length's numbers in the samples."""
    top = samples[-1]
    note = "; ".join(f"{s['length']} tok: {s['relay_peak_gib']:.2f} vs {s['full_peak_gib']:.2f} GiB, "
                     f"{s['relay_tokens_s']:.0f} vs {s['full_tokens_s']:.0f} tok/s" for s in samples)
    return [result("learner_memory_vs_full_logits", top["relay_peak_gib"], top["full_peak_gib"], "GiB peak", 0.25,
                   samples, lower_is_better=True, config=config, note=note),
            result("learner_speed_vs_full_logits", top["relay_tokens_s"], top["full_tokens_s"], "tokens/s", 0.9,
                   samples, config=config)]


def run(quick: bool) -> list[dict]:
    """For benchmarks.run: the bench model at 256, 1024 and 4096 tokens (quick: a small model at 128)."""
    model, lengths = ("quick", (128,)) if quick else ("bench", LENGTHS)
    rows = 1  # the straightforward path at 4096 tokens holds ~10 GB of fp32 logits per row: 1 row on 24 GiB
    samples = measure(model, lengths, rows, repeats=1 if quick else 2)
    return rows_from(samples, {"model": model, "shape": SHAPES[model], "vocab": VOCAB, "prompt_len": PROMPT_LEN,
                               "rows": rows, "device": "cpu", "dtype": "float32"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small model at 128 tokens")
    parser.add_argument("--model", choices=sorted(SHAPES), default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--rows", type=int, default=1, help="rows of the step (responses length, length/2, length/4...)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE, help="for MFU (default H100/H200 bf16)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="learner.logprob_chunk_tokens")
    parser.add_argument("--micro-tokens", type=int, default=None, help="learner.max_tokens_per_micro_batch")
    parser.add_argument("--checkpointing", action="store_true", help="learner.gradient_checkpointing for Relay's path")
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    parser.add_argument("--repeats", type=int, default=None, help="runs of each path per length (default 2; quick 1)")
    parser.add_argument("--child", choices=("full", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or ("quick" if args.quick else "bench")
    if args.child:
        args.path = args.child
        print(json.dumps(child(args)))
        return
    lengths = args.lengths or ((128,) if args.quick else LENGTHS)
    extra = ("--peak-flops", str(args.peak_flops), "--chunk-tokens", str(args.chunk_tokens), "--prompt-len",
             str(args.prompt_len), *(("--micro-tokens", str(args.micro_tokens)) if args.micro_tokens else ()),
             *(("--checkpointing",) if args.checkpointing else ()))
    repeats = args.repeats or (1 if args.quick else 2)
    samples = measure(args.model, lengths, args.rows, args.device, args.dtype, extra, repeats)
    print(json.dumps(rows_from(samples, {"model": args.model, "rows": args.rows, "device": args.device,
                                         "dtype": args.dtype, "peak_flops": args.peak_flops, "repeats": repeats}),
                     indent=1))


if __name__ == "__main__":
    main()
