"""The toy world: a synthetic reasoning task whose answer exists only in the model's own earlier thoughts, and
the tiny Qwen2 model trained on it that ships in toy/ (model.load("toy")). Findings behind it: TOY-NOTES.md.

Task ("chain + memo"). Prompt, pinned in the cache: `<bos> x0 o1 ... o16 <sep>` (P = 19 tokens). Thought:
the chain x_i = (x_{i-1} + o_i) mod 10 for i = 1..16 with x4 written as its memo token `m<x4>` (the chain goes
on from it), then `= X \\boxed{ Y } <eos>`: X = x4 recalled, Y = (X + x16) mod 10 the graded answer. Every
trace is 22 tokens, so rows decode in lockstep without padding. Why a window cannot cheat: x4 is a 5-term
modular sum of prompt digits that a 2-layer model does not recompute in one step, so once the memo token has
left the window (budget P + 8: W = 8, m = 2, evicted before thought 10, recalled at thought 17) Y is a guess.
The memo is a token of its own because the thought encoder pools evicted keys without their positions: what
must be remembered has to be recognisable by its content (with a plain digit PTE learned nothing).

Model: Qwen2, d 64, 2 layers, 4 query / 2 KV heads of 16, SwiGLU 192, qkv bias, tied embeddings, RoPE 1e4
(~100k parameters, 0.4 MB fp32). Trained with model.Transformer itself on traces (loss on thought tokens only),
a quarter of each batch under the window's attention mask, and saved as a Hugging Face folder: config.json,
model.safetensors, tokenizer.json (WordLevel, whitespace split; no chat template: the prompt is the problem text).
Why the windowed quarter: trained on full-cache traces only, the model guessed X under the window with certainty
(~28 nats of KL to the full cache at X), so all G rollouts of a group gave the same answer and GRPO had no signal;
now X is uniform over the digits there (ln 10 nats), chance stays 0.1 and the full cache still solves the task.

    python toy.py build [--steps 1200] [--seed 0] [--out toy]   rebuild the shipped model (about 1 minute on one core)
    python toy.py check [--out toy]                             held-out accuracy, full cache and window at P + 8
    python toy.py compare [--seeds 0,1,2] [--steps 400] [--threads 1]
                                 the experiment: base full/window, LoRA_c, PTE, its ablations (GRPO), PTE distillation
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

import grade
from cache import MaskedForward, evict_count, eviction_steps
from model import TOY_DIR, Transformer, config_from_hf, load, load_tokenizer
from rollout import CachePolicy, generate

N_OPS, MEMO_AT = 16, 4  # chain length; the step whose digit is written as a memo token and recalled at the end
SPECIALS = ["<pad>", "<bos>", "<sep>", "<eos>"]  # dropped by decode(skip_special_tokens=True)
VOCAB = SPECIALS + ["=", "\\boxed{", "}"] + [str(d) for d in range(10)] + [f"m{d}" for d in range(10)]
ID = {tok: i for i, tok in enumerate(VOCAB)}
DIGIT, MEMO = ID["0"], ID["m0"]  # digit d is token DIGIT + d, its memo MEMO + d
PROMPT_LEN, TRACE_LEN = N_OPS + 3, N_OPS + 6  # 19, 22
EVAL_SEED, VALID_SEED = 1_000_003, 1_000_004  # held-out test and validation problems; training draws from --seed

# train.py's defaults for this model folder (train.py reads train_defaults.json in any model folder that has one;
# these made the README's table). Measured (256 held-out problems, 1 thread): PTE-GRPO with the paper-like adapter
# (alpha / r = 1, targets q,k,v,o, lr 1e-3, beta 0.02) stayed at chance. Adam moves every parameter by about lr a
# step: B (zero at init) then grew far too slowly to read a memo that is ~10% of S's fixed norm, and q/k updates
# broke the chain within 10-30 steps. Here B's step is alpha / r * lr = 8e-3, only the output projections are
# adapted, and beta is 0.05. micro_batch 256: one backward pass a step; threads 1: tiny matrices, more threads only
# add synchronisation (7x slower on a busy machine). Its data sets are generated (data.GENERATED): toy-train, toy-eval.
TOY_DEFAULTS = json.loads((TOY_DIR / "train_defaults.json").read_text())


def draw_digits(n, generator):
    """(n, 17) uniform digits: x0, then the operands o1..o16."""
    return torch.randint(0, 10, (n, N_OPS + 1), generator=generator)


def encode(digits):
    """digits (n, 17) -> prompt ids (n, 19) and the full-cache trace ids (n, 22)."""
    n, x = len(digits), digits.cumsum(1) % 10  # x0..x16 (n, 17)
    tok = lambda name: torch.full((n, 1), ID[name])
    steps = DIGIT + x[:, 1:]  # (n, 16) x1..x16
    steps[:, MEMO_AT - 1] = MEMO + x[:, MEMO_AT]  # x4 as its memo token
    recall = x[:, MEMO_AT:MEMO_AT + 1]  # (n, 1)
    answer = (recall + x[:, -1:]) % 10  # (n, 1)
    prompt = torch.cat([tok("<bos>"), DIGIT + digits, tok("<sep>")], 1)
    trace = torch.cat([steps, tok("="), DIGIT + recall, tok("\\boxed{"), DIGIT + answer, tok("}"), tok("<eos>")], 1)
    return prompt, trace


def make_problems(n, seed):
    """n problems {"id", "problem", "answer"} (answer: Y as a string), deterministic in the seed."""
    prompt, trace = encode(draw_digits(n, torch.Generator().manual_seed(seed)))
    return [dict(id=f"toy-{seed}-{i}", problem=" ".join(VOCAB[t] for t in p), answer=VOCAB[t[-3]])
            for i, (p, t) in enumerate(zip(prompt.tolist(), trace.tolist()))]


def training_problems(seed):
    """The data set toy-train (data.GENERATED): 20,000 problems drawn from the run's seed, a pool that does not
    depend on --steps."""
    return make_problems(20_000, seed)


def held_out_problems(seed=None):
    """The data set toy-eval: 4,096 problems from EVAL_SEED whatever the run's seed; the first n of them are
    make_problems(n, EVAL_SEED)."""
    return make_problems(4096, EVAL_SEED)


def hf_config():
    """config.json in the Hugging Face Qwen2 form (model.load and transformers both read it)."""
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=len(VOCAB), hidden_size=64,
                intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1e4,
                tie_word_embeddings=True, use_sliding_window=False, torch_dtype="float32",
                bos_token_id=ID["<bos>"], eos_token_id=ID["<eos>"], pad_token_id=ID["<pad>"])


def make_tokenizer():
    """WordLevel over VOCAB, split on whitespace; decode joins tokens with spaces. Unknown words are an error."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel(ID))
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
    window of budget P + 8 when it was written (SPEC section 2's reference semantics)."""
    T, n = PROMPT_LEN + TRACE_LEN - 1, TRACE_LEN - 1
    W = TOY_DEFAULTS["cache"] - PROMPT_LEN
    m = evict_count(W, TOY_DEFAULTS["evict"])
    steps = torch.tensor(eviction_steps(n, W, m, "window"))
    t = torch.arange(n)
    oldest = m * (steps[None, :] <= t[:, None]).sum(1)  # (n,) first thought still in the window when t is written
    allowed = torch.ones(len(windowed), T, T, dtype=torch.bool).tril()
    allowed[windowed, PROMPT_LEN:, PROMPT_LEN:] &= t[None, :] >= oldest[:, None]
    return torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None]


def train(steps, seed, batch=64, lr=3e-3, warmup=100, windowed=0.25):
    """Supervised next-token training on traces, the loss on the thought tokens only. A share `windowed` of each
    batch is seen under the window: there the memo is gone at X, so the model learns to spread X over the ten
    digits instead of guessing one with certainty (GRPO then sees rewards differ within a group)."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    # PyTorch's default init (embeddings N(0, 1)); with Hugging Face's N(0, 0.02) the loss never left its plateau
    net = Transformer(config_from_hf(hf_config()))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, max(1, min(warmup, steps // 4))))
    data = torch.Generator().manual_seed(seed)
    n_windowed = round(windowed * batch)
    mask = window_mask(torch.arange(batch) < n_windowed)  # (B, 1, T, T)
    bar = tqdm(range(steps), desc=f"toy build, seed {seed}")
    for step in bar:
        prompt, trace = encode(draw_digits(batch, data))
        h = net.hidden(torch.cat([prompt, trace[:, :-1]], 1), cache=MaskedForward(mask))
        logits = net.lm_head(h[:, PROMPT_LEN - 1:])  # (B, 22, V): predicts the trace
        loss = F.cross_entropy(logits.flatten(0, 1), trace.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step(), sched.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net


def build(out_dir=TOY_DIR, steps=1200, seed=0, tries=4, target=0.98):
    """Train with seeds seed, seed + 1, ... and save the first model whose greedy full-cache accuracy on 512
    validation problems reaches `target` (about 3 runs in 10 have not learned Y after 1,200 steps); returns its seed."""
    valid = make_problems(512, VALID_SEED)
    for s in range(seed, seed + tries):
        net = train(steps, s)
        acc = accuracy(net, make_tokenizer(), valid, CachePolicy("full"))
        print(f"seed {s}: validation accuracy {acc:.3f} (full cache)")
        if acc >= target:
            save(net, Path(out_dir))
            return s
    raise RuntimeError(f"no run reached {target} in {tries} tries: nothing saved; try another --seed or more --steps")


def save(net, out):
    """A Hugging Face folder: our parameter names with the "model." prefix; tied, so no lm_head.weight."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + k: v.contiguous() for k, v in net.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(), indent=2) + "\n")
    gen = dict(bos_token_id=ID["<bos>"], eos_token_id=ID["<eos>"], pad_token_id=ID["<pad>"], do_sample=False)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    make_tokenizer().save(str(out / "tokenizer.json"))


def accuracy(model, tokenizer, problems, policy: CachePolicy):
    """Greedy Y accuracy: generate under the policy, decode the completions, grade them with grade.score."""
    prompts = [tokenizer.encode(p["problem"], add_special_tokens=False).ids for p in problems]
    out = generate(model, prompts, policy, TOY_DEFAULTS["max_new"], pad_id=ID["<pad>"])
    texts = tokenizer.decode_batch(out.tokens.tolist(), skip_special_tokens=True)
    return sum(grade.score(text, p["answer"]) for text, p in zip(texts, problems)) / len(problems)


def check(folder, n=256):
    """Print the held-out accuracy under the full cache and under a window at budget P + 8 (chance is 0.1)."""
    model, tokenizer, problems = load(folder), load_tokenizer(folder), make_problems(n, EVAL_SEED)
    acc = {policy: accuracy(model, tokenizer, problems, CachePolicy(policy, TOY_DEFAULTS["cache"], TOY_DEFAULTS["evict"]))
           for policy in ("full", "window")}
    print(f"held-out accuracy, {n} problems, greedy: full cache {acc['full']:.3f}, "
          f"window at budget {TOY_DEFAULTS['cache']} (P + 8) {acc['window']:.3f} (chance 0.1)")
    return acc


COMPARE = [  # (row, train.py arguments, objective): the GRPO rows share steps and rollouts; distillation is our extension
    ("LoRA_c (window)", ["--policy", "window"], "GRPO"), ("PTE", ["--policy", "pte"], "GRPO"),
    ("PTE ablation: global-only", ["--policy", "global-only"], "GRPO"), ("PTE ablation: global-0", ["--policy", "global-0"], "GRPO"),
    ("PTE, distillation (our extension)", ["--policy", "pte", "--objective", "distill"], "distill")]


def compare(seeds, steps, distill_steps, threads, command, n=256):
    """The toy experiment in one command: train every row of COMPARE with train.main at the toy budget for each
    seed, evaluate greedily on n held-out problems, print a markdown table (mean and per-seed accuracy)."""
    import train
    from encoder import load_adapter
    from eval import evaluate
    t0, out = time.perf_counter(), Path(f"runs/toy-compare-{time.strftime('%Y%m%d-%H%M%S')}")
    model, tokenizer, problems = load("toy"), load_tokenizer("toy"), make_problems(n, EVAL_SEED)

    def accuracy_of(policy, adapter=None):
        policy = CachePolicy(policy, TOY_DEFAULTS["cache"], TOY_DEFAULTS["evict"])
        summary, _ = evaluate(model, tokenizer, problems, policy, adapter, max_new=TOY_DEFAULTS["max_new"], batch_size=n, progress=False)
        return summary["accuracy"]

    table = [("base, full cache", "-", "-", [accuracy_of("full")]), ("base, window", "-", "-", [accuracy_of("window")])]
    for name, extra, objective in COMPARE:
        n_steps, accs = distill_steps if objective == "distill" else steps, []
        for seed in seeds:
            run = train.main(["--model", "toy", *extra, "--steps", str(n_steps), "--seed", str(seed), "--threads", str(threads),
                              "--eval-size", "0", "--out", str(out / f"{extra[1]}-{objective.lower()}-seed{seed}")])
            adapter = load_adapter(run / "adapter", model.config)
            accs.append(accuracy_of("window" if adapter.cfg.mode == "lora" else "pte", adapter))
        table.append((name, objective, n_steps, accs))
    print(f"\n$ {command}\nHeld-out accuracy of Y ({n} problems, greedy), budget P + 8 (W = 8, m = 2), seeds {seeds}:\n")
    print("| method | objective | steps | accuracy (mean) | per seed |\n|---|---|---|---|---|")
    for name, objective, n_steps, accs in table:
        print(f"| {name} | {objective} | {n_steps} | {sum(accs) / len(accs):.3f} | {' '.join(f'{a:.3f}' for a in accs)} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s ({threads} thread(s)); runs in {out}/")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build, check or run the experiment of the toy model (see the docstring of toy.py).")
    parser.add_argument("command", choices=("build", "check", "compare"))
    parser.add_argument("--out", type=Path, default=TOY_DIR, help="model folder (default: the repository's toy/)")
    parser.add_argument("--steps", type=int, help="training steps (build: 1200; compare: the GRPO rows, default TOY_DEFAULTS)")
    parser.add_argument("--distill-steps", type=int, default=150, help="steps of the distillation row (compare)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and training-data seed (build)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of every trained row (compare)")
    parser.add_argument("--tries", type=int, default=4, help="seeds to try until one learns the task (build)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic, and kind to a shared CPU)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 1200 if args.command == "build" else TOY_DEFAULTS["steps"]
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if args.steps < 1 or args.tries < 1 or args.distill_steps < 1:
        parser.error("--steps, --distill-steps and --tries must be >= 1")
    torch.set_num_threads(args.threads)
    if args.command == "compare":
        return compare(seeds, args.steps, args.distill_steps, args.threads, shlex.join(["python", "toy.py", *(argv or sys.argv[1:])]))
    if args.command == "build":
        t0 = time.perf_counter()
        try:
            seed = build(args.out, args.steps, args.seed, args.tries)
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
        print(f"built {args.out} in {time.perf_counter() - t0:.0f} s (seed {seed}, {args.steps} steps, {args.threads} thread(s))")
    elif not (args.out / "config.json").exists():
        raise SystemExit(f"no model at {args.out}: build it with  python toy.py build")
    check(args.out)


if __name__ == "__main__":
    main()
