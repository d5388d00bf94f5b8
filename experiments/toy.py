"""The toy world's model and experiments: the tiny Qwen2 that ships in toy/ (model.load("toy")), trained on the toy
task of data.py (its generator: draw_digits, encode, make_problems), and the studies run on it.

Model: Qwen2, d 64, 2 layers, 4 query / 2 KV heads of 16, SwiGLU 192, qkv bias, tied embeddings, RoPE 1e4
(~100k parameters, 0.4 MB fp32). Trained with model.Transformer itself on traces (loss on thought tokens only),
a quarter of each batch under the window's attention mask, and saved as a Hugging Face folder: config.json,
model.safetensors, tokenizer.json (WordLevel, whitespace split; no chat template: the prompt is the problem text).
Why the windowed quarter: trained on full-cache traces only, the model guessed X under the window with certainty
(~28 nats of KL to the full cache at X), so all G rollouts of a group gave the same answer and GRPO had no signal;
now X is uniform over the digits there (ln 10 nats), chance stays 0.1 and the full cache still solves the task.

The k-memo family (length and capacity sweeps): a chain of 4k steps whose steps 1, 5, 9, ... are written as memo
tokens of kinds a, b, c, ... (`b6`: kind b, digit 6), then `=` and the k memos recalled in order, then <eos>
(trace 5k + 2 tokens; the prompt, x0 and the 4k operands padded with `_`, is 35 tokens for every k). At prompt + 8
thought slots the window still shows memo j at its recall only for k <= 4, and none for k >= 5: longer traces leave
more to S. Its own model (vocabulary 108, 128 positions) is built by the sweep commands into runs/toy-memos/model;
its adapters are distilled (GRPO's all-or-nothing reward is too sparse).

    python experiments/toy.py build [--steps 1200] [--seed 0] [--out toy]  rebuild the shipped model (one core)
    python experiments/toy.py check [--out toy]           held-out accuracy, full cache and window at P + 8
    python experiments/toy.py compare [--seeds 0,1,2] [--rows pte,window]  the comparison: base full/window, LoRA_c,
        PTE, its ablations (GRPO) and PTE distillation; table + docs/toy-compare-reward.svg
    python experiments/toy.py lengths [--ks 1,2,4,6] [--steps 100]  recall against trace length; docs/toy-lengths.svg
    python experiments/toy.py capacity [--ks 6] [--ranks 4,8,16,32]  memos S holds against its rank;
        docs/toy-capacity.svg
    python experiments/toy.py probe [--adapter DIR]       how well a linear probe reads the memo from S
The experiment commands are resumable: rerun the same command and finished runs come from the results.json ledger.
A build is deterministic for a given seed, thread count and torch version (other versions train other weights).
"""
import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the core modules
import grade  # noqa: E402
from cache import MaskedForward, evict_count, eviction_steps  # noqa: E402
from data import (DIGIT, EVAL_SEED, ID, MEMO_AT, PROMPT_LEN, SPECIALS, TRACE_LEN, VALID_SEED,  # noqa: E402
                  VOCAB, atomic_write, draw_digits, encode, make_problems)
from model import TOY_DIR, Transformer, config_from_hf, load, load_tokenizer  # noqa: E402
from rollout import CachePolicy, generate  # noqa: E402

# train.py's defaults for this model folder (train.py reads train_defaults.json in any model folder that has one); its
# data sets are generated (data.GENERATED: toy-train, toy-eval). Why these values (measured in docs/toy.md): the
# encoder's S holds the memo from initialisation, so a stall is the readout's. With LoRA's init (B = 0) the first
# updates go to B, which reads one random projection S A x of S, alike at every position, and the chain broke; with
# A = 0 and B random (b_init) they go to A, whose gradient S^T B^T g x^T reads all of S and only where the reward
# speaks, and the encoder learns best at the adapters' rate. Also: alpha / r = 8; only the output projections adapted
# (q/k updates broke the chain); a KL anchor (beta); one backward pass a step (micro_batch); no gradient checkpoints
# (no memory to save, the recompute only costs time); one thread (tiny matrices: more threads only synchronise).
TOY_DEFAULTS = json.loads((TOY_DIR / "train_defaults.json").read_text())


# The k-memo family (length and capacity sweeps): chain of n = 4k steps, the step 4j - 3 written as a memo token of
# kind j (a..h) and digit x_{4j-3}, then `=` and the k memos recalled in order (the same tokens), then <eos>.
# Longer traces carry more to remember; every memo token is recognisable by its content (kind and digit).
K_MAX, MEMO_EVERY, KINDS = 8, 4, "abcdefgh"
VOCAB_MEMOS = VOCAB + [f"{kind}{d}" for kind in KINDS for d in range(10)] + ["_"]  # the shipped toy's 27 ids first
MEMOS_MODEL = (VOCAB_MEMOS, 128)  # vocabulary and position limit of the family's model
MEMO_PROMPT = MEMO_EVERY * K_MAX + 3  # every k's prompt is 35 tokens: x0, the 4k operands, then `_` fillers; with one
# prompt length thought t always finds its operand t + 2 positions in
# (a 2-layer model did not learn a k-dependent offset)


def encode_memos(digits, k):
    """digits (n, 33) -> prompt ids (n, 35: x0, o1..o_4k, `_` fillers) and trace ids (n, 5k + 2): the chain of 4k steps
    with k memos, `=`, the recall, <eos>."""
    n, x = len(digits), digits[:, :MEMO_EVERY * k + 1].cumsum(1) % 10  # x0..x_4k (n, 4k + 1)
    steps = DIGIT + x[:, 1:]  # (n, 4k)
    at = torch.arange(k) * MEMO_EVERY  # thought index of memo j (0-based): x_{4j+1}
    memos = len(VOCAB) + 10 * torch.arange(k) + x[:, at + 1]  # (n, k) token of kind j, digit x_{4j+1}
    steps[:, at] = memos
    tok = lambda name: torch.full((n, 1), ID[name])  # noqa: E731
    filler = torch.full((n, MEMO_EVERY * (K_MAX - k)), len(VOCAB_MEMOS) - 1)  # `_`: the chain ends where they begin
    prompt = torch.cat([tok("<bos>"), DIGIT + digits[:, :MEMO_EVERY * k + 1], filler, tok("<sep>")], 1)
    return prompt, torch.cat([steps, tok("="), memos, tok("<eos>")], 1)


def make_memo_problems(n, k, seed):
    """n k-memo problems {"id", "problem", "answer"} (answer: the recalled memo tokens; graded by recall_accuracy)."""
    prompt, trace = encode_memos(draw_digits(n, torch.Generator().manual_seed(seed), MEMO_EVERY * K_MAX), k)
    words = lambda ids: " ".join(VOCAB_MEMOS[t] for t in ids)  # noqa: E731
    return [dict(id=f"memos{k}-{seed}-{i}", problem=words(p), answer=words(tr[-k - 1:-1]))
            for i, (p, tr) in enumerate(zip(prompt.tolist(), trace.tolist()))]


def recall_accuracy(model, k, policy: CachePolicy, adapter=None, n=256, seed=EVAL_SEED):
    """Share of the k memos recalled right (greedy, n held-out problems; chance 0.1): the recall is the k tokens
    after `=`; a missing or wrong token counts as wrong."""
    prompt, trace = encode_memos(draw_digits(n, torch.Generator().manual_seed(seed), MEMO_EVERY * K_MAX), k)
    out = generate(model, prompt.tolist(), policy, trace.shape[1] + 2, adapter, pad_id=ID["<pad>"])
    return recall_score(out.tokens, trace, k)


def recall_score(tokens, trace, k):
    """Completions (n, T) against the k-memo traces (n, 5k + 2): the share of the k recall tokens (after `=`) that
    match; a completion too short to hold them counts the missing ones as wrong."""
    got = F.pad(tokens, (0, trace.shape[1]), value=-1)[:, MEMO_EVERY * k + 1:5 * k + 1]  # (n, k)
    return (got == trace[:, MEMO_EVERY * k + 1:-1]).float().mean().item()


def hf_config(vocab=VOCAB, max_positions=64):
    """config.json in the Hugging Face Qwen2 form (model.load and transformers both read it)."""
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=len(vocab), hidden_size=64,
                intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                hidden_act="silu", max_position_embeddings=max_positions, rms_norm_eps=1e-6, rope_theta=1e4,
                tie_word_embeddings=True, use_sliding_window=False, torch_dtype="float32",
                bos_token_id=ID["<bos>"], eos_token_id=ID["<eos>"], pad_token_id=ID["<pad>"])


def make_tokenizer(vocab=VOCAB):
    """WordLevel over the vocabulary, split on whitespace; decode joins tokens with spaces."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(vocab)}))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tokenizer


def lr_factor(step, steps, warmup):
    """Linear warm-up, constant, then linear decay to zero over the last fifth. The answer Y is learned late and
    abruptly (anywhere from step 500 to 1,000): under a cosine schedule the rate had often decayed before it was."""
    return min((step + 1) / warmup, 1.0, (steps - step) / (0.2 * steps))


def window_mask(windowed):
    """Additive attention mask (B, 1, T, T) of the training sequence (prompt + trace but its last token): causal
    for full-cache rows; for `windowed` rows each thought sees the prompt and exactly the thoughts that were in the
    window of budget P + 8 when it was written (the reference semantics of docs/method.md §2)."""
    T, n = PROMPT_LEN + TRACE_LEN - 1, TRACE_LEN - 1
    W = TOY_DEFAULTS["cache"] - PROMPT_LEN
    m = evict_count(W, TOY_DEFAULTS["evict"])
    steps = torch.tensor(eviction_steps(n, W, m, "window"))
    t = torch.arange(n)
    oldest = m * (steps[None, :] <= t[:, None]).sum(1)  # (n,) first thought still in the window when t is written
    allowed = torch.ones(len(windowed), T, T, dtype=torch.bool).tril()
    allowed[windowed, PROMPT_LEN:, PROMPT_LEN:] &= t[None, :] >= oldest[:, None]
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


def train(steps, seed, batch=64, lr=3e-3, warmup=100, windowed=0.25, family=False):
    """Supervised next-token training on traces, the loss on the thought tokens only. A share `windowed` of each
    batch is seen under the window: there the memo is gone at X, so the model learns to spread X over the ten
    digits instead of guessing one with certainty (GRPO then sees rewards differ within a group).
    family: the k-memo task instead, k drawn from 1..K_MAX each step, full cache only (its adapters are distilled)."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    # PyTorch's default init (embeddings N(0, 1)); with Hugging Face's N(0, 0.02) the loss never left its plateau
    net = Transformer(config_from_hf(hf_config(*MEMOS_MODEL) if family else hf_config()))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, max(1, min(warmup, steps // 4))))
    data = torch.Generator().manual_seed(seed)
    n_windowed = round(windowed * batch)
    mask = window_mask(torch.arange(batch) < n_windowed)  # (B, 1, T, T)
    bar = tqdm(range(steps), desc=f"toy build, seed {seed}")
    for step in bar:
        if family:
            k = int(torch.randint(1, K_MAX + 1, (), generator=data))
            prompt, trace = encode_memos(draw_digits(batch, data, MEMO_EVERY * K_MAX), k)
        else:
            prompt, trace = encode(draw_digits(batch, data))
        h = net.hidden(torch.cat([prompt, trace[:, :-1]], 1), cache=None if family else MaskedForward(mask))
        logits = net.lm_head(h[:, prompt.shape[1] - 1:])  # (B, trace, V): predicts the trace
        loss = F.cross_entropy(logits.flatten(0, 1), trace.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step(), sched.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net


def build(out_dir=TOY_DIR, steps=1200, seed=0, tries=4, target=0.98, family=False):
    """Train with seeds seed, seed + 1, ... and save the first model whose greedy full-cache accuracy on 512
    validation problems reaches `target` (about 3 runs in 10 have not learned Y after 1,200 steps); returns its seed.
    family: the k-memo model, judged by its recall of K_MAX memos."""
    valid = make_problems(512, VALID_SEED)
    for s in range(seed, seed + tries):
        net = train(steps, s, family=family)
        acc = (recall_accuracy(net, K_MAX, CachePolicy("full"), seed=VALID_SEED) if family
               else accuracy(net, make_tokenizer(), valid, CachePolicy("full")))
        print(f"seed {s}: validation accuracy {acc:.3f} (full cache)")
        if acc >= target:
            save(net, Path(out_dir), *(MEMOS_MODEL if family else ()))
            return s
    raise RuntimeError(f"no run reached {target} in {tries} tries: nothing saved; try another --seed or more --steps")


def save(net, out, vocab=VOCAB, max_positions=64):
    """A Hugging Face folder: our parameter names with the "model." prefix; tied, so no lm_head.weight."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + k: v.contiguous() for k, v in net.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(vocab, max_positions), indent=2) + "\n")
    gen = dict(bos_token_id=ID["<bos>"], eos_token_id=ID["<eos>"], pad_token_id=ID["<pad>"], do_sample=False)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    make_tokenizer(vocab).save(str(out / "tokenizer.json"))


def accuracy(model, tokenizer, problems, policy: CachePolicy):
    """Greedy Y accuracy: generate under the policy, decode the completions, grade them with grade.score."""
    prompts = [tokenizer.encode(p["problem"], add_special_tokens=False).ids for p in problems]
    out = generate(model, prompts, policy, TOY_DEFAULTS["max_new"], pad_id=ID["<pad>"])
    texts = tokenizer.decode_batch(out.tokens.tolist(), skip_special_tokens=True)
    return sum(grade.score(text, p["answer"]) for text, p in zip(texts, problems)) / len(problems)


def check(folder, n=256):
    """Print the held-out accuracy under the full cache and under a window at budget P + 8 (chance is 0.1)."""
    model, tokenizer, problems = load(folder), load_tokenizer(folder), make_problems(n, EVAL_SEED)
    acc = {policy: accuracy(model, tokenizer, problems,
                            CachePolicy(policy, TOY_DEFAULTS["cache"], TOY_DEFAULTS["evict"]))
           for policy in ("full", "window")}
    print(f"held-out accuracy, {n} problems, greedy: full cache {acc['full']:.3f}, "
          f"window at budget {TOY_DEFAULTS['cache']} (P + 8) {acc['window']:.3f} (chance 0.1)")
    return acc


def memo_probe(model, adapter, n=2048, seed=VALID_SEED, ridge=10.0):
    """How much S knows about the memo: held-out accuracy (chance 0.1) of a ridge-regression probe that reads the
    memo digit x4 from the cores S of all layers as they stand when X is predicted (after the last fold before the
    forward of thought 16), fitted on 3/4 of n greedy rollouts under pte at the toy budget, scored on the rest."""
    fold_cores, folds = adapter.update_cores, []

    def recording(*args, **kw):  # rollout.fold's calls: one per layer and eviction, in order
        new, ratio = fold_cores(*args, **kw)
        folds.append(new)
        return new, ratio
    digits = draw_digits(n, torch.Generator().manual_seed(seed))
    adapter.update_cores = recording
    try:
        policy = CachePolicy("pte", TOY_DEFAULTS["cache"], TOY_DEFAULTS["evict"])
        generate(model, encode(digits)[0].tolist(), policy, 18, adapter)
    finally:
        del adapter.update_cores
    W = TOY_DEFAULTS["cache"] - PROMPT_LEN
    last = sum(t <= 16 for t in eviction_steps(TRACE_LEN, W, evict_count(W, TOY_DEFAULTS["evict"]), "window")) - 1
    L = model.config.n_layers
    x = torch.cat(folds[last * L:(last + 1) * L]).transpose(0, 1).flatten(1)  # (n, L r r)
    x = torch.cat([(x - x.mean(0)) / (x.std(0) + 1e-6), torch.ones(n, 1)], 1)
    y, fit = digits[:, :MEMO_AT + 1].sum(1) % 10, 3 * n // 4
    w = torch.linalg.solve(x[:fit].T @ x[:fit] + ridge * torch.eye(x.shape[1]),
                           x[:fit].T @ F.one_hot(y[:fit], 10).float())
    return ((x[fit:] @ w).argmax(1) == y[fit:]).float().mean().item()


# (row, train.py arguments, objective): the GRPO rows share steps and rollouts; distillation is our extension
COMPARE = [
    ("PTE", ["--policy", "pte"], "GRPO"), ("LoRA_c (window)", ["--policy", "window"], "GRPO"),
    ("PTE ablation: global-only", ["--policy", "global-only"], "GRPO"),
    ("PTE ablation: global-0", ["--policy", "global-0"], "GRPO"),
    ("PTE, distillation (our extension)", ["--policy", "pte", "--objective", "distill"], "distill")]


def ledger_result(ledger: Path, key, work):
    """Resumable experiments: the result of `key` from the JSON ledger, else work() -> dict, timed (seconds) and
    written to the ledger at once, so that a killed command loses at most the row in progress."""
    done = json.loads(ledger.read_text()) if ledger.exists() else {}
    if key not in done:
        t0 = time.perf_counter()
        result = work()
        done = json.loads(ledger.read_text()) if ledger.exists() else {}
        done[key] = dict(result, seconds=round(time.perf_counter() - t0, 1))
        ledger.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(ledger, lambda p: p.write_text(json.dumps(done, indent=1)))  # two commands may share it
    return done[key]


def train_adapter(model, run: Path, args):
    """train.main with `args` into folder `run` (continuing its checkpoint if a killed call left one, else afresh);
    the adapter."""
    import shutil
    import train
    from encoder import load_adapter
    if not (run / "latest").exists():
        shutil.rmtree(run, ignore_errors=True)  # killed before its first checkpoint: nothing to continue
    train.main([*args, *(["--resume", str(run)] if (run / "latest").exists() else ["--out", str(run)])])
    return load_adapter(run / "adapter", model.config)


def reward_curves(runs, smooth_over=10):
    """{row: [run folders]} -> line-chart series of the reward per step, the mean over the runs, smoothed."""
    import plot
    series = []
    for name, folders in runs.items():
        per_run = [[json.loads(line)["reward"] for line in (f / "metrics.jsonl").read_text().splitlines()
                    if "reward" in json.loads(line)] for f in folders if (f / "metrics.jsonl").exists()]
        if per_run and (n := min(map(len, per_run))):
            mean = [sum(r[i] for r in per_run) / len(per_run) for i in range(n)]
            series.append((name, list(range(1, n + 1)), plot.smooth(mean, smooth_over)))
    return series


def compare(seeds, steps, distill_steps, threads, command, rows=None, out=Path("runs/toy-compare"), plots=Path("docs"),
            n=256):
    """The toy experiment in one command: train every row of COMPARE (or those named in `rows`) with train.main at
    the toy budget for each seed, evaluate greedily on n held-out problems, print a markdown table (mean and
    per-seed accuracy) and write the reward curves (mean over seeds) to plots/toy-compare-reward.svg.
    Resumable: rerun the same command and finished runs are read from out/results.json."""
    import plot
    from eval import evaluate
    model, tokenizer, problems = load("toy"), load_tokenizer("toy"), make_problems(n, EVAL_SEED)
    ledger = out / "results.json"

    def accuracy_of(policy, adapter=None):
        policy = CachePolicy(policy, TOY_DEFAULTS["cache"], TOY_DEFAULTS["evict"])
        summary, _ = evaluate(model, tokenizer, problems, policy, adapter, max_new=TOY_DEFAULTS["max_new"],
                              batch_size=n, progress=False)
        return dict(accuracy=summary["accuracy"])

    table = [(name, "-", "-", [ledger_result(ledger, f"base-{p}", lambda p=p: accuracy_of(p))])
             for name, p in (("base, full cache", "full"), ("base, window", "window"))]
    runs = {}
    for name, extra, objective in COMPARE:
        n_steps = distill_steps if objective == "distill" else steps
        folders = [out / f"{extra[1]}-{objective.lower()}-{n_steps}steps-seed{seed}" for seed in seeds]
        done = json.loads(ledger.read_text()) if ledger.exists() else {}
        # not to train: its done seeds
        if rows and extra[1] + ("-distill" if objective == "distill" else "") not in rows:
            if finished := [(seed, f) for seed, f in zip(seeds, folders) if f.name in done]:
                partial = (f" (seeds {','.join(str(seed) for seed, _ in finished)})"
                           if len(finished) < len(seeds) else "")
                table.append((name + partial, objective, n_steps, [done[f.name] for _, f in finished]))
                runs[name + partial] = [f for _, f in finished]
            continue
        results = []
        for seed, run in zip(seeds, folders):
            args = ["--model", "toy", *extra, "--steps", str(n_steps), "--seed", str(seed), "--threads", str(threads),
                    "--eval-size", "0"]
            results.append(ledger_result(ledger, run.name, lambda run=run, args=args: accuracy_of(
                "window" if extra[1] == "window" else "pte", train_adapter(model, run, args))))
        table.append((name, objective, n_steps, results))
        runs[name] = folders
    series = reward_curves(runs)
    curve = plot.save(plot.line_chart(series, f"Toy: mean reward of the rollouts over {len(seeds)} seed(s)", "step",
                                      "reward (10-step mean)", ylim=(0, 1)),
                      plots / "toy-compare-reward.svg") if series else "none"
    print(f"\n$ {command}\nHeld-out accuracy of Y ({n} problems, greedy), budget P + 8 (W = 8, m = 2), "
          f"seeds {seeds}:\n")
    print("| method | objective | steps | accuracy (mean) | per seed |\n|---|---|---|---|---|")
    for name, objective, n_steps, results in table:
        accs = [r["accuracy"] for r in results]
        print(f"| {name} | {objective} | {n_steps} | {sum(accs) / len(accs):.3f} | "
              f"{' '.join(f'{a:.3f}' for a in accs)} |")
    total = sum(r["seconds"] for _, _, _, results in table for r in results)
    print(f"\ntotal time {total:.0f} s of training and evaluation ({threads} thread(s)); runs in {out}/; "
          f"reward curves: {curve}")


MEMOS_DIR = Path("runs/toy-memos")


def memo_model(ledger, seed=0, steps=2000):
    """The k-memo family's model, built once into runs/toy-memos/model (one try, kept whatever its full-cache recall:
    the table's first row shows it); its build time goes into the ledger."""
    folder = MEMOS_DIR / "model"
    built = ledger_result(ledger, "build",
                          lambda: dict(seed=build(folder, steps, seed, tries=1, target=0.0, family=True)))
    return load(folder), built["seconds"]


def memo_adapter(model, k, policy, rank, steps, seed, threads):
    """Distill (our extension: GRPO's reward is too sparse for k memos) an adapter on the k-memo task at budget
    P + 8."""
    data = MEMOS_DIR / f"k{k}-train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(p) + "\n" for p in make_memo_problems(20_000, k, seed=1)))
    max_new = 5 * k + 4
    args = ["--model", str(MEMOS_DIR / "model"), "--data", str(data), "--policy", policy, "--objective", "distill",
            "--cache", str(MEMO_PROMPT + 8), "--evict", "0.25", "--rank", str(rank), "--alpha", str(8.0 * rank),
            "--globals", "8", "--targets", "o", "--lr", "1e-3", "--max-new", str(max_new), "--group", "1",
            "--prompts-per-step", "64", "--micro-batch", "64", "--steps", str(steps), "--save-every", str(steps),
            "--eval-size", "0", "--seed", str(seed), "--threads", str(threads), "--log-samples-every", "0"]
    return train_adapter(model, MEMOS_DIR / f"k{k}-{policy}-r{rank}-{steps}steps-seed{seed}", args)


def memo_sweep(what, ks, ranks, steps, seed, threads, command, plots=Path("docs"), n=256):
    """lengths: recall accuracy against trace length (k memos) for the base model (full cache, window), LoRA_c
    and PTE; capacity: memos PTE holds against rank at k = ks[-1]. Table, SVG plot, resumable via the ledger."""
    import plot
    ledger = MEMOS_DIR / "results.json"
    model, build_seconds = memo_model(ledger)
    policy = lambda name, k: CachePolicy(name, MEMO_PROMPT + 8, 0.25)  # noqa: E731
    acc = lambda key, fn: ledger_result(ledger, key, lambda: dict(accuracy=fn()))  # noqa: E731
    if what == "lengths":
        rows = {"full cache (base)": lambda k: acc(f"k{k}-base-full", lambda: recall_accuracy(
                    model, k, policy("full", k))),
                "window (base)": lambda k: acc(f"k{k}-base-window", lambda: recall_accuracy(
                    model, k, policy("window", k))),
                "LoRA_c (distilled)": lambda k: acc(f"k{k}-window-r16-{steps}", lambda: recall_accuracy(
                    model, k, policy("window", k), memo_adapter(model, k, "window", 16, steps, seed, threads))),
                "PTE (distilled)": lambda k: acc(f"k{k}-pte-r16-{steps}", lambda: recall_accuracy(
                    model, k, policy("pte", k), memo_adapter(model, k, "pte", 16, steps, seed, threads)))}
        results = {name: [fn(k) for k in ks] for name, fn in rows.items()}
        xs, xlabel = [5 * k + 2 for k in ks], "trace length (tokens; k = (length - 2) / 5 memos)"
        head = "| method | " + " | ".join(f"k = {k} ({5 * k + 2} tokens)" for k in ks) + " |"
        ylabel, title = "memos recalled (share, chance 0.1)", "Recall against trace length, 8 thought slots"
    else:
        k = ks[-1]
        results = {f"PTE (distilled), k = {k}": [acc(f"k{k}-pte-r{r}-{steps}", lambda r=r: recall_accuracy(
            model, k, policy("pte", k), memo_adapter(model, k, "pte", r, steps, seed, threads))) for r in ranks]}
        xs, xlabel, head = ranks, "rank r of S", "| method | " + " | ".join(f"r = {r}" for r in ranks) + " |"
        ylabel, title = "memos recalled (share, chance 0.1)", f"Capacity of S: recall of {k} memos against rank"
    path = plot.save(plot.line_chart([(name, xs, [r["accuracy"] for r in rs]) for name, rs in results.items()], title,
                                     xlabel, ylabel, ylim=(0, 1), xlog=what == "capacity"), plots / f"toy-{what}.svg")
    print(f"\n$ {command}\nShare of memos recalled ({n} held-out problems, greedy; chance 0.1), "
          f"cache: prompt + 8 thought slots, evict 2:\n\n{head}\n|---|" + "---|" * len(xs))
    for name, rs in results.items():
        print(f"| {name} | " + " | ".join(f"{r['accuracy']:.3f}" for r in rs) + " |")
        if what == "capacity":  # chance-corrected: k (share - 0.1) / 0.9
            print("| memos S holds (of k = {}) | ".format(ks[-1]) + " | ".join(
                f"{ks[-1] * (r['accuracy'] - 0.1) / 0.9:.2f}" for r in rs) + " |")
    total = sum(r["seconds"] for rs in results.values() for r in rs)
    print(f"\ntotal time {total + build_seconds:.0f} s ({build_seconds:.0f} s of it the model's build; "
          f"{threads} thread(s)); runs in {MEMOS_DIR}/; plot: {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Build, check or run the experiments of the toy model (see the docstring of toy.py).")
    parser.add_argument("command", choices=("build", "check", "compare", "lengths", "capacity", "probe"))
    parser.add_argument("--adapter", type=Path, help="adapter folder to probe (probe; default: a fresh one at --seed)")
    parser.add_argument("--out", type=Path, default=TOY_DIR, help="model folder (default: the repository's toy/)")
    parser.add_argument("--steps", type=int, help="training steps (build: 1200; compare: the GRPO rows, "
                        "default TOY_DEFAULTS; lengths, capacity: distillation steps, default 100)")
    parser.add_argument("--distill-steps", type=int, default=150, help="steps of the distillation row (compare)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initialisation and training-data seed (build, lengths, capacity)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of every trained row (compare)")
    parser.add_argument("--rows", help="comma-separated rows to train (compare): pte, window, global-only, global-0, "
                        "pte-distill; the others show the seeds already done (--rows none: report only)")
    parser.add_argument("--ks", default="1,2,4,6", help="memos per trace (lengths; capacity uses the last)")
    parser.add_argument("--ranks", default="4,8,16,32", help="ranks of S (capacity)")
    parser.add_argument("--plots", type=Path, default=Path("docs"), help="folder of the SVG plots")
    parser.add_argument("--tries", type=int, default=4, help="seeds to try until one learns the task (build)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: deterministic, and kind to a shared CPU)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = dict(build=1200, lengths=100, capacity=100).get(args.command, TOY_DEFAULTS["steps"])
    try:
        seeds, ks, ranks = ([int(s) for s in getattr(args, name).split(",")] for name in ("seeds", "ks", "ranks"))
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}, --ks {args.ks!r}, --ranks {args.ranks!r}: "
                     "give comma-separated integers, e.g. 0,1,2")
    if not all(1 <= k <= K_MAX for k in ks) or min(ranks) < 1:
        parser.error(f"--ks must lie in 1..{K_MAX} and --ranks be >= 1")
    if args.steps < 1 or args.tries < 1 or args.distill_steps < 1:
        parser.error("--steps, --distill-steps and --tries must be >= 1")
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "experiments/toy.py", *(argv or sys.argv[1:])])
    if args.command == "compare":
        rows = args.rows.split(",") if args.rows else None
        return compare(seeds, args.steps, args.distill_steps, args.threads, command, rows, plots=args.plots)
    if args.command == "probe":
        from encoder import Adapter, AdapterConfig, load_adapter
        model = load("toy")
        torch.manual_seed(args.seed)
        adapter = load_adapter(args.adapter, model.config) if args.adapter else Adapter(model.config, AdapterConfig(
            "pte", TOY_DEFAULTS["rank"], TOY_DEFAULTS["alpha"], TOY_DEFAULTS["globals"],
            TOY_DEFAULTS["targets"].split(",")))
        return print(f"memo probe from S: {memo_probe(model, adapter):.3f} held-out accuracy (chance 0.1); {command}")
    if args.command in ("lengths", "capacity"):
        return memo_sweep(args.command, ks, ranks, args.steps, args.seed, args.threads, command, args.plots)
    if args.command == "build":
        t0 = time.perf_counter()
        try:
            seed = build(args.out, args.steps, args.seed, args.tries)
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        print(f"built {args.out} in {time.perf_counter() - t0:.0f} s (seed {seed}, {args.steps} steps, "
              f"{args.threads} thread(s))")
    elif not (args.out / "config.json").exists():
        raise SystemExit(f"no model at {args.out}: build it with  python experiments/toy.py build")
    check(args.out)


if __name__ == "__main__":
    main()
