"""Accuracy of a model (and adapter) on math benchmarks under a cache policy.

`evaluate` is the library call (train.py's held-out check, toy.py's experiment); `main` is the command line:

    python eval.py --model qwen2.5-1.5b --adapter runs/pte --bench math500,aime24 --samples 4 --temperature 0.6

Per benchmark and policy: avg@k (mean correctness of all k samples of every problem), pass@k (share of problems
with at least one right sample: with n = k samples the unbiased estimator of Chen et al. is exactly this), mean
completion length in tokens (EOS included), share stopped by --max-new, and evictions per sample (those that came
before the sample's last token, i.e. that changed what it saw). results.json keeps every setting behind the
numbers; samples.jsonl every completion with its grade. --kl adds fidelity, for any model and adapter and without a
grader: the mean per-token KL(full-cache base model || policy) over each completion's tokens after its first
eviction, on the policy's own completions (token_kl). A problem whose prompt leaves fewer than MIN_THOUGHT_SLOTS
thought slots under the budget is skipped and counted (`skipped`). With --adapter, the policy, budget and evict share
default to those it was trained with. Rows are batched longest prompt first (less left padding), at most --batch-size
rows a `generate` call (the role of train.py's --rollout-batch); results come back in problem order. Under sampling
the draws depend on the batching: reruns match with the same --batch-size and --seed. The output folder has one
writer (an OS lock); Ctrl-C or SIGTERM stop with exit 130 or 143 and leave no partial file.
"""
import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import grade
import model as models
import rollout
from cache import MIN_THOUGHT_SLOTS
from data import device_name, number
from encoder import load_adapter

def summarize(records, samples, tokens_per_s):
    """Per-sample records in problem order (`samples` consecutive rows a problem) -> the summary dict; with `kl`
    records, kl: the per-token mean over all their scored tokens (None when no completion reached an eviction)."""
    groups = [records[i:i + samples] for i in range(0, len(records), samples)]
    mean = lambda key: sum(float(r[key]) for r in records) / len(records)  # noqa: E731
    summary = dict(n=len(groups), samples=samples, accuracy=mean("correct"),
                   pass_at_k=sum(any(r["correct"] for r in g) for g in groups) / len(groups),
                   mean_length=mean("length"), truncated=mean("truncated"), evictions_per_sample=mean("evictions"),
                   tokens_per_s=tokens_per_s)
    if "kl" in records[0]:
        n_kl = sum(r["kl_tokens"] for r in records)
        summary.update(kl=sum(r["kl"] * r["kl_tokens"] for r in records if r["kl_tokens"]) / n_kl if n_kl else None,
                       kl_tokens=n_kl)
    return summary


class _NoHead:
    """The model with an identity lm_head: `score` then hands its token_fn final hidden states (B, n, d), not logits."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    @staticmethod
    def lm_head(h):
        return h


def token_kl(model, ro, policy, adapter=None, use_checkpoint=False, truncate=False):
    """(B, T): per token of the rollout, KL(full-cache base model || the policy with its adapter) between their
    next-token distributions at temperature 1; differentiable in the adapter where autograd is on (train.py's
    distillation objective, docs/method.md §8). The teacher's hidden states (B, T, d) are kept, never its (B, T, V)
    logits: its log-softmax is recomputed inside the policy's token function, rollout.LOGIT_CHUNK positions a time."""
    with torch.no_grad():
        hidden = rollout.score(_NoHead(model), ro, rollout.CachePolicy("full", policy.budget, policy.evict),
                               use_checkpoint=False, token_fn=lambda h, _, span: h)  # (B, T, d)

    def kl(logits, _, span):  # (B, n, V) -> (B, n)
        teacher = torch.log_softmax(model.lm_head(hidden[:, span[0]:span[1]]).float(), -1)  # (B, n, V)
        return (teacher.exp() * (teacher - torch.log_softmax(logits.float(), -1))).sum(-1)
    return rollout.score(model, ro, policy, adapter, use_checkpoint=use_checkpoint, token_fn=kl, truncate=truncate)


def kl_start(ro, policy, row):
    """The first thought index whose prediction saw an eviction in `row` (None: none did): the one after the first
    eviction; under `full`, the one a window of the same budget would have had (budget - prompt length + 1)."""
    if policy.policy == "full":
        return max(policy.budget - int(ro.prompt_lens[row]), 0) + 1
    evictions = ro.evictions[row]  # each row has its own window and schedule
    return evictions[0] + 1 if evictions else None


def evaluate(model, tokenizer, problems, policy: rollout.CachePolicy, adapter=None, family=None, max_new=3072,
             samples=1, temperature=0.0, top_p=1.0, batch_size=8, seed=0, progress=True, kl=False, compile=None):
    """Generate `samples` completions of each {"id", "problem", "answer"} under `policy` and grade them.
    kl: also each completion's mean token_kl over its tokens after its first eviction (see kl_start), and their count.
    Returns (summary, records): see summarize; records in problem order, `samples` a problem."""
    if samples < 1 or batch_size < 1:
        raise ValueError(f"--samples and --batch-size must be at least 1, got {samples} and {batch_size}")
    if not problems:
        raise ValueError("no problems to evaluate")
    prompts = [tokenizer.encode(data.format_prompt(p["problem"], family), add_special_tokens=False).ids
               for p in problems]
    rows = sorted(((i, s) for i in range(len(problems)) for s in range(samples)), key=lambda r: -len(prompts[r[0]]))
    generator = torch.Generator(model.embed_tokens.weight.device).manual_seed(seed)
    sampling = rollout.Sampling(max_new, temperature, top_p)
    done, seconds, tokens = {}, 0.0, 0
    bar = tqdm(total=len(rows), disable=not progress, unit="sample", desc=f"{policy.policy} {len(problems)} problems")
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        out = rollout.generate(model, [prompts[i] for i, _ in batch], policy, sampling, adapter, generator, compile)
        if start == 0 and out.stats.get("first_step_s"):
            bar.write(f"compiled decode step: first call {out.stats['first_step_s']:.1f} s (compiling included)")
        seconds, tokens = seconds + out.stats["seconds"], tokens + out.stats["tokens"]
        if kl:
            with torch.no_grad():
                per_token = token_kl(model, out, policy, adapter)  # (b, T)
        for b, ((i, s), n) in enumerate(zip(batch, out.mask.sum(1).tolist())):  # the mask is a prefix of each row
            text = tokenizer.decode(out.tokens[b, :n].tolist(), skip_special_tokens=True)
            gold = problems[i]["answer"]
            done[i, s] = dict(id=problems[i]["id"], sample=s, completion=text, answer=grade.extract_answer(text),
                              gold=gold, correct=grade.score(text, gold) == 1.0, length=n,
                              truncated=bool(out.truncated[b]), evictions=sum(t < n - 1 for t in out.evictions[b]))
            if kl:
                start = kl_start(out, policy, b)
                scored = per_token[b, start:n] if start is not None else per_token[b, :0]
                done[i, s].update(kl=scored.mean().item() if len(scored) else None, kl_tokens=len(scored))
        bar.update(len(batch))
    bar.close()
    records = [done[i, s] for i in range(len(problems)) for s in range(samples)]
    return summarize(records, samples, tokens / seconds if seconds else 0.0), records


def table(results):
    """Markdown table of (bench, policy) summaries."""
    head = ("| bench | policy | n | skipped | k | avg@k | pass@k | mean length | KL to full | truncated "
            "| evictions/sample | tokens/s |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        lines.append(f"| {r['bench']} | {r['policy']} | {r['n']} | {r['skipped']} | {r['samples']} | "
                     f"{100 * r['accuracy']:.1f} | {100 * r['pass_at_k']:.1f} | {r['mean_length']:.0f} | "
                     f"{'-' if r.get('kl') is None else format(r['kl'], '.4f')} | {100 * r['truncated']:.0f}% | "
                     f"{r['evictions_per_sample']:.1f} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="registry name or Hugging Face folder")
    p.add_argument("--adapter", help="folder written by train.py (adapter.json + adapter.safetensors)")
    p.add_argument("--bench", required=True, help="comma-separated names (math500,aime24,...) or .jsonl paths")
    p.add_argument("--data-dir", help="where {name}.jsonl live (default: $PTE_DATA, else data/)")
    p.add_argument("--policy", help="comma-separated full|window|pte (default: the adapter's, else full)")
    p.add_argument("--cache", type=number(int, 1), help="cache budget in tokens: prompt + thought slots (default: the "
                   f"adapter's, else 1024); a prompt that leaves fewer than {MIN_THOUGHT_SLOTS} thought slots is "
                   "skipped and counted")
    p.add_argument("--evict", type=number(float, 0, 1, above=True),
                   help="share of the thought window evicted at a time (default: the adapter's, else 0.25)")
    p.add_argument("--max-new", type=number(int, 1), default=3072)
    p.add_argument("--samples", type=number(int, 1), default=1, help="k completions a problem")
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0)
    p.add_argument("--batch-size", type=number(int, 1), default=8,
                   help="rows of one generate call, longest prompts first (as train.py's --rollout-batch): it sets the "
                   "rollout memory")
    p.add_argument("--limit", type=number(int, 1), help="the first N problems of each benchmark")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    p.add_argument("--kl", action="store_true", help="also the mean per-token KL(full-cache base model || policy) "
                   "after each completion's first eviction (under full: where a window of --cache would first evict)")
    p.add_argument("--out", help="a new or empty folder (default: runs/eval-<timestamp>)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=number(int, 1, os.cpu_count()), help="torch.set_num_threads (default: torch's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="decode through the compiled step (rollout.compiled_step; default: on cuda, off on the CPU)")
    return p


def with_adapter_defaults(p, args):
    """--policy, --cache and --evict left unset take the adapter's (as it was trained, through the flags' checks), else
    full, 1024 and 0.25. Warns when the adapter was trained on another model than --model."""
    meta = models.read_json(Path(args.adapter) / "adapter.json") if args.adapter else {}
    trained = meta.get("settings") or {}
    if args.adapter and not args.policy and "policy" not in meta:
        raise ValueError(f"{args.adapter}/adapter.json records no policy: pass --policy")
    args.policy = args.policy or meta.get("policy", "full")
    for key, default in (("cache", 1024), ("evict", 0.25)):
        if getattr(args, key) is None:
            action = next(a for a in p._actions if a.dest == key)
            try:
                setattr(args, key, data.file_value(action, trained.get(key, default)))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{args.adapter}/adapter.json: settings.{key}: {e}") from None
    model = str(trained.get("model", args.model))
    if model != args.model and not (Path(model).is_dir() and Path(model).resolve() == Path(args.model).resolve()):
        print(f"WARNING: the adapter {args.adapter} was trained on --model {model}, not {args.model}", file=sys.stderr)
    return args


def claim(out: Path):
    """The output folder, locked for this process (data.only_writer), refused unless new or empty (stale .part files
    of a killed evaluation aside)."""
    held = [name for name in data.contents(out) if not name.endswith(".part")]
    if {"results.json", "samples.jsonl"} & set(held):
        raise ValueError(f"--out {out} holds an evaluation already (results.json or samples.jsonl): name another --out")
    if held:
        raise ValueError(f"--out {out} is not empty ({', '.join(held[:3])}{' ...' if len(held) > 3 else ''}): "
                         "name a new or empty folder")
    return data.only_writer(out)


def run(p, args, argv):
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    args = with_adapter_defaults(p, args)
    names = args.policy.split(",")
    policies = [rollout.CachePolicy(name, args.cache, args.evict) for name in names]  # rejects unknown names
    folder = models.resolve(args.model)
    budget = None if set(names) == {"full"} else args.cache  # every policy sees the same problems
    if error := data.beyond_positions(folder, cache=budget, max_new=args.max_new):
        raise ValueError(error)
    benches = {name: data.load_problems(name, args.data_dir)[:args.limit] for name in args.bench.split(",")}
    tokenizer, family = models.load_tokenizer(folder), data.chat_family(folder)
    skipped = {}
    for name, problems in benches.items():
        benches[name], _, skipped[name] = data.encode_prompts(problems, tokenizer, family, budget)
        if not benches[name]:
            raise ValueError(f"{name}: every prompt leaves fewer than {MIN_THOUGHT_SLOTS} thought slots at "
                             f"--cache {args.cache}")
    with claim(out):
        device = data.run_device(args.device)
        net = models.load(args.model, None if args.dtype == "auto" else getattr(torch, args.dtype), device)
        adapter = load_adapter(args.adapter, net.config, device) if args.adapter else None
        if "pte" in names and (adapter is None or not adapter.encodes):
            raise ValueError("--policy pte needs --adapter with a thought encoder (adapter mode pte, global-0 or "
                             f"global-only), got {'no adapter' if adapter is None else 'mode ' + adapter.cfg.mode}")
        return write_results(out, argv, args, net, tokenizer, family, adapter, device, benches, policies, skipped)


def write_results(out, argv, args, net, tokenizer, family, adapter, device, benches, policies, skipped):
    """Evaluate every (bench, policy) into samples.jsonl and results.json, each written as .part and renamed at the
    end; a stop or an error removes the .part files."""
    command = shlex.join(["python", "eval.py", *argv])
    results = dict(command=command, args=vars(args), model_dir=str(models.resolve(args.model)), chat_family=family,
                   adapter_mode=adapter.cfg.mode if adapter else None, grader_version=grade.GRADER_VERSION,
                   torch=torch.__version__, device=str(device), dtype=str(net.embed_tokens.weight.dtype), results=[])
    parts = [out / "samples.jsonl.part", out / "results.json.part"]
    start = time.perf_counter()
    try:
        with open(parts[0], "w", encoding="utf-8") as f:
            for bench, problems in benches.items():
                for policy in policies:
                    summary, records = evaluate(net, tokenizer, problems, policy, adapter, family, args.max_new,
                                                args.samples, args.temperature, args.top_p, args.batch_size,
                                                args.seed, kl=args.kl, compile=args.compile)
                    results["results"].append(dict(bench=bench, policy=policy.policy, budget=policy.budget,
                                                   evict=policy.evict, skipped=skipped[bench], **summary))
                    f.writelines(json.dumps(dict(bench=bench, policy=policy.policy, **r), ensure_ascii=False) + "\n"
                                 for r in records)
        results["wall_s"] = time.perf_counter() - start
        parts[1].write_text(json.dumps(results, indent=1))
        os.replace(parts[0], out / "samples.jsonl")
        os.replace(parts[1], out / "results.json")
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
    print(f"$ {command}\n\n{table(results['results'])}\n\nwall {results['wall_s']:.1f} s; results in {out}/")
    return results


def main(argv=None):
    """eval.py's command line. Ctrl-C or SIGTERM stop it with exit 130 or 143, leaving no partial file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args = p.parse_args(argv)
    with data.stop_on_signals():
        try:
            return run(p, args, argv)
        except data.Stop as e:
            print(f"\n{signal.Signals(e.args[0]).name}: stopped; nothing was written", file=sys.stderr)
            raise SystemExit(128 + e.args[0]) from None
        except (ValueError, OSError) as e:
            p.error(str(e))


if __name__ == "__main__":
    with data.quiet_exit():
        main()
