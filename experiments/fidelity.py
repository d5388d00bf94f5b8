"""How much of the full-cache model survives under a small cache, on SmolLM2-135M-Instruct (a laptop experiment).

    python experiments/fidelity.py --threads 1           # resumable: the same command again continues where it stopped

Measure: eval.py's --kl, the mean per-token KL(full-cache base model || policy) over each completion's tokens after
its first eviction, on the policy's own completions (sampled at temperature 1, 256 tokens at most).
Setting: GSM8K problems whose templated prompt is 88 to 91 tokens long (104 of 1,319), budget 91 + --slots, so that
every row's thought window is --slots to --slots + 3. Rows: the bare window; LoRA_c (policy window) and PTE (policy
pte), both trained by train.py's distillation objective (Objective, --objective distill) with the same adapter
shape, seed, steps and data. Departure from on-policy distillation (too slow here): the training rollouts are
sampled once from the bare window and reused, so the students are teacher-forced on the window's completions.
Paired check (less noise than each row on its own completions): every row scored on the same held-out completions,
sampled once from the bare window. Writes to --out: rollouts.pt, lora_c/ and pte/ (train.py checkpoints, then
adapter/), eval-*.json, paired.json, fidelity.svg (the main measure).
"""
import argparse
import dataclasses
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the core modules
import data  # noqa: E402
import model as models  # noqa: E402
import plot  # noqa: E402
import train  # noqa: E402
from encoder import Adapter, AdapterConfig, load_adapter, save_adapter, trainable  # noqa: E402
from eval import evaluate, kl_start, token_kl  # noqa: E402
from rollout import CachePolicy, Rollout, Sampling, generate  # noqa: E402

MODEL = os.environ.get("PTE_SMOLLM2") or "smollm2-135m"  # a folder of it, else the registry name (the HF cache)
BAND = (88, 91)  # templated prompt lengths kept: one budget gives every row nearly the same window
ROWS = (("bare window", "window", None), ("LoRA_c", "window", "lora_c"), ("PTE", "pte", "pte"))


def parser():
    p = argparse.ArgumentParser(prog="experiments/fidelity.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL, help="SmolLM2-135M-Instruct: $PTE_SMOLLM2, else the "
                   "registry name (Hugging Face cache)")
    p.add_argument("--data-dir", help="where gsm8k.jsonl lives (default: $PTE_DATA, else data/)")
    p.add_argument("--slots", type=int, default=64, help="thought slots of the shortest prompt: budget 91 + slots")
    p.add_argument("--max-new", type=int, default=256, help="completion token limit (training and evaluation)")
    p.add_argument("--eval-size", type=int, default=16, help="held-out problems evaluated per row")
    p.add_argument("--rollouts", type=int, default=32, help="training rollouts, sampled once from the bare window")
    p.add_argument("--rows", type=int, default=4, help="rollouts per optimizer step (one micro-batch)")
    p.add_argument("--steps", type=int, default=12, help="AdamW steps of each trained row")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--globals", type=int, default=32, help="global tokens of PTE's encoder")
    p.add_argument("--targets", default="q,k,v,o")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/fidelity", help="run folder (rerun with the same one to resume)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    return p


def sample_rollouts(net, prompts, policy, args, out):
    """The training rollouts, sampled 8 at a time (saved after each batch: a restart keeps the batches done), then
    cut into pieces of --rows, one piece a step."""
    path = out / "rollouts.pt"
    saved = torch.load(path, weights_only=False) if path.exists() else dict(batches=[], seconds=0.0)
    for i in tqdm(range(len(saved["batches"]), -(-len(prompts) // 8)), desc="training rollouts", unit="batch"):
        t0, gen = time.perf_counter(), torch.Generator().manual_seed(args.seed * 1009 + i)
        ro = generate(net, prompts[i * 8:(i + 1) * 8], policy, Sampling(args.max_new, 1.0), generator=gen)
        saved["batches"].append(dataclasses.asdict(ro))
        saved["seconds"] += time.perf_counter() - t0
        data.atomic_write(path, lambda p: torch.save(saved, p))
    batches = [Rollout(**b) for b in saved["batches"]]
    pieces = [train.take(ro, rows) for ro in batches for rows in torch.arange(len(ro.mask)).split(args.rows)]
    return pieces, saved["seconds"]


def distill(net, rollouts, name, policy, args, out):
    """--steps distillation steps on the reused rollouts, checkpointed every 4; returns (adapter, seconds)."""
    run = out / name
    run.mkdir(exist_ok=True)
    if (run / "adapter" / "adapter.json").exists():
        return load_adapter(run / "adapter", net.config), json.loads((run / "time.json").read_text())["seconds"]
    targs = train.parse_args(["--model", args.model, "--policy", policy.policy, "--objective", "distill",
                              "--cache", str(policy.budget), "--micro-batch", str(args.rows), "--rank", str(args.rank),
                              "--globals", str(args.globals), "--targets", args.targets, "--lr", str(args.lr),
                              "--seed", str(args.seed)])
    settings = dict(vars(targs), cache_policy=policy.policy)
    torch.manual_seed(args.seed)  # the same A for both rows (B = 0: both start as the bare window)
    mode = "pte" if policy.policy == "pte" else "lora"
    adapter = Adapter(net.config, AdapterConfig(mode, args.rank, targs.alpha, args.globals, args.targets.split(",")))
    optimizer = torch.optim.AdamW(trainable(adapter), lr=args.lr, weight_decay=0.0)
    start, seconds = 0, 0.0
    if (run / "latest").exists():
        start, adapter, state = train.load_checkpoint(run, settings, net.config, "cpu")
        optimizer = torch.optim.AdamW(trainable(adapter), lr=args.lr, weight_decay=0.0)
        optimizer.load_state_dict(state)
        seconds = json.loads((run / "time.json").read_text())["seconds"]
        train.trim_log(run / "metrics.jsonl", start)  # the steps after the checkpoint run again
    objective = train.Objective(net, adapter, targs, policy, None)  # no reference policy: distillation has none
    for step in tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"distill {name}"):
        t0, ro = time.perf_counter(), rollouts[step % len(rollouts)]
        stats = train.update(objective, optimizer, ro, torch.zeros(args.rows), targs, 1)
        seconds += time.perf_counter() - t0
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(step=step + 1, kl=stats["kl"], grad_norm=stats["grad_norm"])) + "\n")
        if (step + 1) % 4 == 0 or step + 1 == args.steps:
            train.save_checkpoint(run, step + 1, adapter, optimizer, settings)
            data.atomic_write(run / "time.json", lambda p: p.write_text(json.dumps(dict(seconds=seconds))))
    save_adapter(adapter, run / "adapter", policy=policy.policy, settings=settings)
    return adapter, seconds


def paired(net, prompts, budget, adapters, args, out):
    """A lower-noise check beside the main measure: every row scored on the same 256-token completions, sampled once
    from the bare window. Returns {label: (token-mean KL, s.e. of its per-completion difference from the window's)}."""
    path = out / "paired.json"
    if not path.exists():
        t0, gen = time.perf_counter(), torch.Generator().manual_seed(args.seed + 1)
        ro = generate(net, prompts, CachePolicy("window", budget), Sampling(args.max_new, 1.0), generator=gen)
        kls = {}  # label -> (per-completion sums, token counts) over each row's tokens after its first eviction
        for label, policy, name in ROWS:
            with torch.no_grad():  # token_kl follows autograd where it is on (train.py's distillation)
                per_token = token_kl(net, ro, CachePolicy(policy, budget), adapters[name])  # (B, T)
            scored = torch.zeros_like(ro.mask)
            for b, n in enumerate(ro.mask.sum(1).tolist()):
                scored[b, kl_start(ro, CachePolicy(policy, budget), b) or n:n] = True
            kls[label] = (torch.where(scored, per_token, 0).sum(1), scored.sum(1))
        _, n = kls[ROWS[0][0]]
        keep = n > 0
        window = kls[ROWS[0][0]][0][keep] / n[keep]
        result = {label: (float(sums.sum() / counts.sum()),
                          float(((sums[keep] / n[keep] - window).std() / keep.sum() ** 0.5)))
                  for label, (sums, counts) in kls.items()}
        record = dict(result=result, seconds=time.perf_counter() - t0)
        data.atomic_write(path, lambda p: p.write_text(json.dumps(record)))
    saved = json.loads(path.read_text())
    return saved["result"], saved["seconds"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_size < 2:
        raise SystemExit("--eval-size must be at least 2 (the standard error over completions needs two)")
    if args.rollouts % 8 or 8 % args.rows:
        raise SystemExit(f"--rollouts {args.rollouts} must be a multiple of 8, and --rows {args.rows} divide 8")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net, tokenizer = models.load(args.model), models.load_tokenizer(args.model)
    family = data.chat_family(models.resolve(args.model))
    encode = lambda p: tokenizer.encode(data.format_prompt(p["problem"], family),  # noqa: E731
                                        add_special_tokens=False).ids
    problems = [p for p in data.read_problems(data.resolve_data("gsm8k", args.data_dir))
                if BAND[0] <= len(encode(p)) <= BAND[1]]
    random.Random(args.seed).shuffle(problems)
    held_out, train_set = problems[:args.eval_size], problems[args.eval_size:]
    if len(train_set) < args.rollouts:
        raise SystemExit(f"{len(train_set)} problems left for {args.rollouts} training rollouts: lower --rollouts")
    prompts = [encode(p) for p in train_set[:args.rollouts]]
    budget = BAND[1] + args.slots
    rollouts, seconds = sample_rollouts(net, prompts, CachePolicy("window", budget), args, out)
    times = {"training rollouts": seconds}
    adapters = {None: None}
    for _, policy, name in ROWS[1:]:
        adapters[name], times[f"distill {name}"] = distill(net, rollouts, name, CachePolicy(policy, budget), args, out)
    results = []
    for label, policy, name in ROWS:
        path = out / f"eval-{name or 'window'}.json"
        if not path.exists():
            t0 = time.perf_counter()
            summary, records = evaluate(net, tokenizer, held_out, CachePolicy(policy, budget), adapters[name], family,
                                        args.max_new, temperature=1.0, seed=args.seed, kl=True)
            per_completion = torch.tensor([r["kl"] for r in records if r["kl_tokens"]])  # the spread behind the mean
            summary.update(kl_se=(per_completion.std() / len(per_completion) ** 0.5).item(),
                           seconds=time.perf_counter() - t0)
            data.atomic_write(path, lambda p: p.write_text(json.dumps(dict(summary, records=records),
                                                                  indent=1)))
        results.append((label, json.loads(path.read_text())))
        times[f"eval {label}"] = results[-1][1]["seconds"]
    window_kl = results[0][1]["kl"]
    same, times["paired check"] = paired(net, [encode(p) for p in held_out], budget, adapters, args, out)
    print(f"\n$ {shlex.join(['python', 'fidelity.py', *argv])}\n\nSmolLM2-135M-Instruct, {len(held_out)} held-out "
          f"GSM8K problems (prompts {BAND[0]}-{BAND[1]} tokens), budget {budget} (window {args.slots}-"
          f"{budget - BAND[0]} slots), "
          f"sampled at T = 1, at most {args.max_new} tokens; trained rows: {args.steps} steps x {args.rows} rollouts "
          f"of the bare window (teacher-forced), lr {args.lr}, rank {args.rank}, targets {args.targets}\n")
    print("| row | KL(full \\|\\| row) per token after the first eviction | s.e. over completions "
          "| share of the window's KL closed | scored tokens | mean length | accuracy |\n|---|---|---|---|---|---|---|")
    for label, r in results:
        closed = (window_kl - r["kl"]) / window_kl
        print(f"| {label} | {r['kl']:.4f} | {r['kl_se']:.4f} | {closed:+.0%} | {r['kl_tokens']} | "
              f"{r['mean_length']:.0f} | {r['accuracy']:.3f} |")
    print(f"\nPaired check: every row on the same {len(held_out)} completions of the bare window\n\n"
          "| row | KL(full \\|\\| row) per token after the first eviction | share closed "
          "| s.e. of the per-completion difference from the window |\n|---|---|---|---|")
    for label, (kl, se) in same.items():
        print(f"| {label} | {kl:.4f} | {(same[ROWS[0][0]][0] - kl) / same[ROWS[0][0]][0]:+.0%} | {se:.4f} |")
    svg = plot.bar_chart([(label, r["kl"], r["kl_se"], f"({(window_kl - r['kl']) / window_kl:+.0%} closed)")
                          for label, r in results],
                         f"SmolLM2-135M, prompt + {args.slots} slots: KL(full || row) per token after the first "
                         "eviction, with its standard error")
    (out / "fidelity.svg").write_text(svg)
    print(f"\ntime: {sum(times.values()):.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in times.items())}); "
          f"{torch.get_num_threads()} thread(s); plot {out / 'fidelity.svg'}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # no model, no data: the message says what to get
        sys.exit(f"fidelity.py: error: {e}")
