"""Does the thought encoder's state S carry what the window lost? A recall task on SmolLM2-135M-Instruct (CPU).

    python experiments/recall.py            # the whole study (2 workers); resumable: the same command continues
    python experiments/recall.py --quick    # every row end to end with tiny counts, the same tables

The task. The pinned prompt (SmolLM2's chat template around one user message) names k letters and asks for a digit
for each; it never holds the digits. The assistant's text, teacher-forced, states the fact early ("The pairs: K4 B8
Q1 D7."), continues with natural filler sentences, then recalls it ("Once more: K4 B8 Q1 D7."). The fact lies in the
first m thoughts, so the first eviction takes it, and the first recalled digit comes after exactly `distance`
evictions: the bare window cannot see the fact there, the full cache can.
Labelled items: the encoder pools each eviction into S without positions, so it cannot tell the order of the digits
of one eviction; each digit is bound to its letter instead, and the prompt pins the letters, so the recall asks
"which digit went with K", never "which digit came third". Facts are disjoint between training and held-out texts
by letter: ten letters label the training facts, the other ten the held-out ones, and digits are uniform on both
sides, so no held-out fact was seen and no training statistic predicts a held-out digit.

Rows, at equal settings (adapter shape, steps, learning rate, initial weights, training texts): the bare window;
LoRA_c (window + LoRA: S = I); PTE; PTE global-only (S stays S(0)); and the full cache, the teacher. Each trained row
is distilled to the full-cache base model's next-token distribution (docs/method.md §8: forward KL per completion
token), teacher-forced on the synthetic texts, with AdamW on the adapter's parameters. The teacher is a plain causal
forward of the whole text (every prompt of a task has the same length, so nothing is padded on the left); its final
hidden states are kept and its log-softmax recomputed a chunk at a time inside the student's token_fn.
Measured on held-out texts: recall accuracy (greedy argmax at each recalled digit, the prefix teacher-forced),
KL(full || row) on those digits, and KL on every other token after the first eviction (the adapter must not buy
recall by breaking the rest); standard errors over texts, and the paired difference PTE minus LoRA_c.
Tables: the main comparison (two seeds), recall against the fact's size k at two ranks, against the distance, the
settings tried, and the twins (two texts that differ only in the evicted digits: only S can tell them apart). Writes
to --out: ledger.json (every finished run, merged and rewritten atomically under a lock after each, so that the
--jobs worker processes and other commands may share it) and the plots. Results: docs/recall.md.
"""
import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "experiments"):  # the core modules, and plot.py beside this file
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402

import data  # noqa: E402
import model as models  # noqa: E402
import plot  # noqa: E402
from cache import evict_count  # noqa: E402
from encoder import Adapter, AdapterConfig, load_adapter, param_groups, save_adapter, trainable  # noqa: E402
from rollout import CachePolicy, Rollout, score  # noqa: E402

LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # one token each with a leading space; no word letters (A, I) nor vowels
FILLER = (
    "The weather was mild this morning, so we took a long walk along the river.",
    "A small bakery near the station sells bread that is still warm at noon.",
    "My neighbour has started growing tomatoes on her balcony this summer.",
    "The library was quiet, and most people were reading by the tall windows.",
    "We cooked a simple soup with carrots, onions and a little garlic.",
    "The train was late, but the view from the bridge made up for it.",
    "In the evening the park fills with people walking their dogs.",
    "Someone left a bicycle leaning against the old stone wall.",
    "The market on the square is busiest just before lunch.",
    "Rain tapped on the roof while the kettle slowly came to a boil.",
    "The museum has a new room full of paintings of the sea.",
    "Children were flying kites on the hill behind the school.",
    "The coffee shop on the corner plays soft music all afternoon.",
    "Autumn leaves had covered the path in red and yellow.",
    "My friend is learning to play the guitar and practises every night.",
    "The river was high after the storm, and the ducks stayed close to the bank.",
    "A cat slept in the sun on the steps of the post office.",
    "The bus driver waved to everyone who got off at the last stop.",
    "We found an old map of the town in a box in the attic.",
    "The garden smelled of fresh grass after it was mowed.",
    "Fresh snow made the whole street look clean and bright.",
    "The small harbour was full of fishing boats painted in bright colours.",
    "My grandmother tells the best stories about the village where she grew up.",
    "The bookshop has a shelf of travel guides to places far away.",
    "Birds gathered on the wires as the sun went down.",
    "The soup needed more salt, so we added a pinch before serving it.",
    "A street musician played the violin outside the theatre.",
    "The lake was so calm that the mountains shone on its surface.",
    "We spent the afternoon painting the fence behind the house.",
    "The city lights looked beautiful from the top of the hill.",
    "A gentle wind moved the curtains in the open window.",
    "The farmer sold apples and pears from the back of his truck.",
    "Our teacher brought a plant to class and asked us to look after it.",
    "The footpath through the forest is lined with ferns and moss.",
    "Tea tastes better when you drink it slowly on a cold day.",
    "The old clock in the hall still chimes every hour.",
    "Two friends were playing chess on a bench in the shade.",
    "The kitchen smelled of cinnamon while the cake was baking.",
    "A boat drifted slowly down the canal under the bridges.",
    "The beach was nearly empty, and the waves were small and quiet.",
)
ROWS = {  # row -> (adapter mode, cache policy)
    "full": (None, "full"), "window": (None, "window"), "lora_c": ("lora", "window"), "pte": ("pte", "pte"),
    "global-only": ("global-only", "pte")}
LABELS = {"full": "full cache", "window": "bare window", "lora_c": "LoRA_c", "pte": "PTE", "global-only": "global-only"}


# ---------------------------------------------------------------------------------------------------- the texts

@dataclasses.dataclass(frozen=True)
class Task:
    """k labelled digits; the first recalled digit comes after `distance` evictions of a window of `window` thought
    slots that evicts m = evict_count(window, evict) at a time."""
    k: int = 4
    distance: int = 1
    window: int = 40
    evict: float = 0.5

    @property
    def m(self):
        return evict_count(self.window, self.evict)

    def recall_span(self):
        """Thought indices where the first recalled digit may sit: its prediction (made at the token before it) has
        seen exactly `distance` evictions (before thoughts W, W + m, ...) and the first took the fact."""
        return self.window + (self.distance - 1) * self.m + 1, self.window + self.distance * self.m


@dataclasses.dataclass
class Text:
    prompt: list  # token ids: the chat template around the instruction
    thoughts: list  # token ids of the assistant's text, EOS last
    facts: list  # thought indices of the recalled digits (k)
    stated: list  # thought indices of the digits where the fact is first stated (k)
    letters: str
    digits: str


def letter_split(seed):
    """(training letters, held-out letters): ten each, so held-out facts share no letter, hence no fact, with training
    ones, and within either side every digit is equally likely for every letter. (A split of the (letter, digit)
    pairs instead leaves five digits a letter in training: the adapter learns them, and is then wrong on held-out.)"""
    letters = random.Random(f"letters-{seed}").sample(LETTERS, len(LETTERS))
    return "".join(sorted(letters[:10])), "".join(sorted(letters[10:]))


def instruction(letters):
    """The user message: names the letters (the labels), never the digits."""
    named = letters if len(letters) == 1 else ", ".join(letters[:-1]) + f" and {letters[-1]}"
    what = "the pair" if len(letters) == 1 else "the pairs"
    return (f"Pick a digit for {'the letter' if len(letters) == 1 else 'each of the letters'} {named}. Write "
            f"{what}, then a few sentences on something else, then {what} once more.")


def _digit_tokens(encoding, text, start):
    """Token indices of the digits of text[start:] as they occur in the (unsplit) encoding of text."""
    chars = [i for i in range(start, len(text)) if text[i].isdigit()]
    return [next(j for j, (a, b) in enumerate(encoding.offsets) if a <= c < b) for c in chars]


def make_text(task, tokenizer, rng, alphabet, eos_id, tries=200):
    """One text: k distinct letters of `alphabet`, a random digit each, filler sentences drawn until the first
    recalled digit falls in task.recall_span() (redrawn when a whole sentence overshoots it)."""
    letters = "".join(rng.sample(alphabet, task.k))
    digits = "".join(rng.choice("0123456789") for _ in letters)
    pairs = " ".join(c + d for c, d in zip(letters, digits))
    head, tail = f"The {'pair' if task.k == 1 else 'pairs'}: {pairs}.\n\n", f"\n\nOnce more: {pairs}."
    prompt = tokenizer.encode(data.TEMPLATES["chatml"].format(instruction(letters)), add_special_tokens=False).ids
    lo, hi = task.recall_span()
    for _ in range(tries):
        filler, last = [], None
        while True:
            text = head + " ".join(filler) + tail
            enc = tokenizer.encode(text, add_special_tokens=False)
            recall = _digit_tokens(enc, text, len(text) - len(tail))
            if recall[0] > hi:
                break
            last = (text, enc, recall)
            filler.append(rng.choice([s for s in FILLER if s not in filler]))  # no sentence twice
        if last and last[2][0] >= lo:
            text, enc, recall = last
            stated = _digit_tokens(enc, text[:len(head)], 0)
            if stated[-1] >= task.m:
                raise ValueError(f"the fact ends at thought {stated[-1]}, past the first eviction's m = {task.m}: "
                                 "raise the window or the evict share, or lower k")
            return Text(prompt, enc.ids + [eos_id], recall, stated, letters, digits)
    raise ValueError(f"no filler draw puts the recall in thoughts {lo}..{hi} in {tries} tries")


def make_texts(task, tokenizer, n, split, eos_id, data_seed=0, draw=0):
    """n texts on the `train` or `held-out` letters of letter_split(data_seed), reproducible from (task, split,
    draw)."""
    alphabet = letter_split(data_seed)[{"train": 0, "held-out": 1}[split]]
    rng = random.Random(f"{split}-{data_seed}-{draw}-{task.k}-{task.distance}-{task.window}-{task.evict}")
    return [make_text(task, tokenizer, rng, alphabet, eos_id) for _ in range(n)]


def as_rollout(texts, task, policy, pad_id):
    """Texts of one task -> (the Rollout that `score` replays, its CachePolicy): prompts of one length, completions
    padded after EOS, every row's evictions as the policy's schedule gives them (what generate would have recorded)."""
    P = len(texts[0].prompt)
    if any(len(t.prompt) != P for t in texts):
        raise ValueError("the texts of one batch must share a prompt length (one task, k fixed)")
    T, B = max(len(t.thoughts) for t in texts), len(texts)
    tokens = torch.tensor([t.thoughts + [pad_id] * (T - len(t.thoughts)) for t in texts])  # (B, T)
    mask = torch.tensor([[j < len(t.thoughts) for j in range(T)] for t in texts])  # (B, T)
    cache = CachePolicy(policy, P + task.window, task.evict)
    sched = cache.schedule([P] * B, T)
    evictions = [sched.steps(i, T - 1) for i in range(B)]  # generate evicts before every thought but the last
    return Rollout(torch.tensor([t.prompt for t in texts]), torch.full((B,), P), tokens, torch.zeros(B, T), mask,
                   torch.zeros(B, dtype=torch.bool), evictions), cache


# ---------------------------------------------------------------------------------------------------- teacher, student

@torch.no_grad()
def teacher_hidden(net, ro):
    """The full-cache base model's final hidden states (B, T, d) that predict each thought: one causal forward of
    prompt + thoughts (no left padding: one prompt length), the state before thought t at position P - 1 + t."""
    P = ro.prompts.shape[1]
    return net.hidden(torch.cat([ro.prompts, ro.tokens], 1))[:, P - 1:-1]  # (B, T, d)


def kl_to_teacher(net, hidden, argmax=None):
    """score's token_fn: KL(teacher || student) per position, the teacher's log-softmax recomputed for this chunk
    only (never (B, T, V) at once); writes the student's greedy token into `argmax` (B, T) when given."""
    def fn(logits, targets, span):  # logits (B, n, V), targets (B, n) -> (B, n)
        teacher = torch.log_softmax(net.lm_head(hidden[:, span[0]:span[1]]).float(), -1)  # (B, n, V)
        student = torch.log_softmax(logits.float(), -1)  # (B, n, V)
        if argmax is not None:
            argmax[:, span[0]:span[1]] = logits.argmax(-1)
        return (teacher.exp() * (teacher - student)).sum(-1)
    return fn


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of one table: the row, the task it is evaluated on, and (trained rows) what it is trained on, the
    adapter and its optimiser. texts "twins": trained and evaluated on twins(), not on drawn texts."""
    row: str
    task: Task = Task()
    train: tuple = ()  # the tasks trained on, a step each in turn (default: the evaluated task)
    texts: str = "drawn"
    rank: int = 32
    alpha: float = 32.0
    targets: str = "q,k,v,o"
    b_init: float = 0.0
    lr: float = 1e-3
    encoder_lr: float | None = None
    v_scale: float = 1.0  # W_V's initial scale times this (10: the scale of W_K, the paper's)
    seed: int = 0
    steps: int = 0  # AdamW steps (0: --steps)
    digits_only: bool = False  # the loss on the recalled digits alone (a diagnostic, not the distill objective)

    @property
    def trained(self):
        return ROWS[self.row][0] is not None

    def train_key(self):
        """The name of the trained adapter (rows evaluated on several tasks share one)."""
        tasks = "+".join(f"k{t.k}d{t.distance}W{t.window}e{t.evict}" for t in self.train or (self.task,))
        return (f"{self.row} {self.texts} {tasks} r{self.rank} a{self.alpha:g} {self.targets} b{self.b_init:g} "
                f"lr{self.lr:g} elr{self.encoder_lr or self.lr:g} v{self.v_scale:g} s{self.seed}"
                + (f" n{self.steps}" if self.steps else "") + (" digits-only" if self.digits_only else ""))

    def key(self):
        """The ledger's name of the run (an untrained row depends on its texts and task only)."""
        t = self.task
        evaluated = f"{self.texts} k{t.k} d{t.distance} W{t.window} e{t.evict}"
        return f"{self.train_key()} -> {evaluated}" if self.trained else f"{self.row} {evaluated}"


def distill(net, setting, batches, n_globals, grad_clip=1.0):
    """AdamW on the adapter's parameters, one step a batch of (texts, rollout, cache policy, teacher states): the
    mean per-token KL(full-cache base || row) over the completion tokens. Returns (adapter, losses, the mean KL at
    the recalled digits of each step's texts)."""
    mode, _ = ROWS[setting.row]
    torch.manual_seed(setting.seed)  # A and B first in Adapter: every row of a seed starts from the same weights
    adapter = Adapter(net.config, AdapterConfig(mode, setting.rank, setting.alpha, n_globals,
                                                setting.targets.split(","), setting.b_init))
    if adapter.encodes and setting.v_scale != 1:
        with torch.no_grad():
            adapter.W_V.mul_(setting.v_scale)
    optimizer = torch.optim.AdamW(param_groups(adapter, setting.lr, setting.encoder_lr), lr=setting.lr,
                                  weight_decay=0.0)
    losses, digit_kls = [], []
    for texts, ro, cache, hidden in batches:
        per_token = score(net, ro, cache, adapter, use_checkpoint=False, token_fn=kl_to_teacher(net, hidden))
        digits = torch.cat([per_token[b, t.facts] for b, t in enumerate(texts)])  # (sum of k,)
        loss = digits.mean() if setting.digits_only else per_token[ro.mask].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(adapter), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        digit_kls.append(digits.mean().item())
    return adapter, losses, digit_kls


@torch.no_grad()
def evaluate(net, adapter, task, batches):
    """Per held-out text: accuracy of the greedy token at the k recalled digits and at the first of them, mean KL
    there, and the KL summed over every other completion token whose prediction saw an eviction (thoughts W + 1 on)
    with its count."""
    out = dict(accuracy=[], digit_kl=[], first=[], first_kl=[], other_kl=[], other_n=[])
    for texts, ro, cache, hidden in batches:
        argmax = torch.zeros_like(ro.tokens)  # (B, T)
        kl = score(net, ro, cache, adapter, use_checkpoint=False, token_fn=kl_to_teacher(net, hidden, argmax))
        for b, text in enumerate(texts):
            facts = torch.tensor(text.facts)
            other = torch.zeros(ro.tokens.shape[1], dtype=torch.bool)
            other[task.window + 1:len(text.thoughts)] = True
            other[facts] = False
            right = argmax[b, facts] == ro.tokens[b, facts]  # (k,)
            out["accuracy"].append(right.float().mean().item())
            out["digit_kl"].append(kl[b, facts].mean().item())
            out["first"].append(right[0].float().item())
            out["first_kl"].append(kl[b, facts[0]].item())
            out["other_kl"].append(kl[b, other].sum().item())
            out["other_n"].append(int(other.sum()))
    return out


def twins(task, tokenizer, n, eos_id, data_seed=0):
    """n texts identical but for the digits (text i adds 3 i mod 10 to each): same prompt, letters and filler. Up to
    the first recalled digit a row without S sees the same tokens in all of them, so it predicts that digit alike
    in all, and is right in at most one; only S (the evicted fact) can tell them apart."""
    if not 1 <= n <= 10:
        raise ValueError(f"{n} twins: between 1 and 10 (their first digits differ)")
    base = make_texts(task, tokenizer, 1, "train", eos_id, data_seed, draw="twins")[0]
    ids = [tokenizer.token_to_id(str(d)) for d in range(10)]
    out = []
    for i in range(n):
        digits = "".join(str((int(c) + 3 * i) % 10) for c in base.digits)
        thoughts = list(base.thoughts)
        for j, d in zip(base.stated + base.facts, digits + digits):
            thoughts[j] = ids[int(d)]
        out.append(dataclasses.replace(base, thoughts=thoughts, digits=digits))
    return out


# ---------------------------------------------------------------------------------------------------- the study

def prepared(net, tokenizer, task, split, n, size, args, memo, draw=0):
    """[(texts, teacher hidden states)] in batches of `size`, memoised: the rows of one task share them."""
    key = (task, split, n, size, draw)
    if key not in memo:
        eos = net.config.eos_ids[0]
        texts = (twins(task, tokenizer, args.twins, eos, args.data_seed) if split == "twins" else
                 make_texts(task, tokenizer, n, split, eos, args.data_seed, draw))
        if len(memo) >= 6:  # a few tasks' states at a time (tens of MB each)
            memo.clear()
        memo[key] = [(chunk, teacher_hidden(net, as_rollout(chunk, task, "full", eos)[0]))
                     for chunk in (texts[i:i + size] for i in range(0, len(texts), size))]
    return memo[key]


def record(args, ledger, section, key, value):
    """ledger[section][key] = value, merged into the file's ledger (workers and commands may share one) under a lock,
    and written atomically."""
    path = args.out / "ledger.json"
    with open(args.out / "ledger.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # read, merge and write as one: no writer loses another's record
        if path.exists():
            on_disk = json.loads(path.read_text())
            for name in ("adapters", "runs"):
                ledger[name].update(on_disk[name])
        ledger[section][key] = value
        data.atomic_write(path, lambda p: p.write_text(json.dumps(ledger)))


def trained(net, tokenizer, setting, args, ledger, memo):
    """The setting's adapter: loaded from --out/adapters when a run trained it before, else distilled (a step per
    batch, cycling through its training tasks) and saved there."""
    folder = args.out / "adapters" / hashlib.sha1(setting.train_key().encode()).hexdigest()[:12]
    if setting.train_key() in ledger["adapters"] and (folder / "adapter.json").exists():
        return load_adapter(folder, net.config)
    t0, eos, tasks = time.perf_counter(), net.config.eos_ids[0], setting.train or (setting.task,)
    policy = ROWS[setting.row][1]
    if setting.texts == "twins":
        batches = prepared(net, tokenizer, setting.task, "twins", args.twins, args.twins, args, memo) * args.twin_steps
        batches = [(texts, *as_rollout(texts, setting.task, policy, eos), hidden) for texts, hidden in batches]
    else:
        steps = setting.steps or args.steps
        per_task = -(-steps // len(tasks))
        drawn = [prepared(net, tokenizer, task, "train", per_task * args.batch, args.batch, args, memo,
                          draw=setting.seed) for task in tasks]
        batches = [(texts, *as_rollout(texts, tasks[i % len(tasks)], policy, eos), hidden) for i in range(steps)
                   for texts, hidden in [drawn[i % len(tasks)][i // len(tasks)]]]
    adapter, losses, digit_kls = distill(net, setting, batches, args.globals)
    save_adapter(adapter, folder, train_key=setting.train_key())
    record(args, ledger, "adapters", setting.train_key(), dict(losses=losses, digit_kl=digit_kls,
                                                               seconds=time.perf_counter() - t0))
    print(f"trained {setting.train_key()}: {time.perf_counter() - t0:.0f} s", flush=True)
    return adapter


def run(net, tokenizer, setting, args, ledger, memo):
    """One row: its adapter (trained rows), evaluated on the held-out texts (the twins themselves for "twins");
    recorded in the ledger, or read back from it when a command finished it before."""
    key = setting.key()
    if key not in ledger["runs"] and (args.out / "ledger.json").exists():  # another command may have finished it
        on_disk = json.loads((args.out / "ledger.json").read_text())
        for name in ("adapters", "runs"):
            ledger[name].update(on_disk[name])
    if key in ledger["runs"]:
        return ledger["runs"][key]
    adapter = trained(net, tokenizer, setting, args, ledger, memo) if setting.trained else None
    t0, eos, policy = time.perf_counter(), net.config.eos_ids[0], ROWS[setting.row][1]
    held = (prepared(net, tokenizer, setting.task, "twins", args.twins, args.twins, args, memo)
            if setting.texts == "twins" else
            prepared(net, tokenizer, setting.task, "held-out", args.eval_size, args.batch * 2, args, memo))
    result = evaluate(net, adapter, setting.task, [(texts, *as_rollout(texts, setting.task, policy, eos), hidden)
                                                   for texts, hidden in held])
    result.update(setting=dataclasses.asdict(setting), seconds=time.perf_counter() - t0)
    record(args, ledger, "runs", key, result)
    print(f"{key}: accuracy {sum(result['accuracy']) / len(result['accuracy']):.3f}, {result['seconds']:.0f} s",
          flush=True)
    return result


SIZES, DISTANCES = (1, 2, 4, 8), (1, 2, 4)
SWEEP = (  # (label, change from the base PTE): one change at a time, the toy's choices together, longer training
    ("A = 0, B ~ N(0, 0.01^2) (b_init 0.01)", dict(b_init=0.01)),
    ("alpha / r = 8", dict(alpha=256.0)),
    ("targets o only", dict(targets="o")),
    ("lr 3e-3", dict(lr=3e-3)),
    ("encoder lr x10", dict(encoder_lr=1e-2)),
    ("W_V at W_K's scale (x10)", dict(v_scale=10.0)),
    ("b_init 0.01, alpha / r = 8, o only", dict(b_init=0.01, alpha=256.0, targets="o")),
    ("3x the steps", dict(steps=3)),
    ("LoRA_c, 3x the steps", dict(row="lora_c", steps=3)),
    ("the loss on the recalled digits alone", dict(digits_only=True)),
    ("LoRA_c, the loss on the recalled digits alone", dict(row="lora_c", digits_only=True)),
)


def plan(args):
    """[(table, label, Setting)]: every run of the study, the main comparison first."""
    base = dict(rank=args.rank, alpha=args.alpha, targets=args.targets, b_init=args.b_init, lr=args.lr,
                encoder_lr=args.encoder_lr)
    main, out = Task(), []
    for seed in args.seeds:
        out += [("main", LABELS[row], Setting(row, main, seed=seed, **base)) for row in ROWS
                if seed == args.seeds[0] or ROWS[row][0]]  # the untrained rows once
    ratio, mix = args.alpha / args.rank, tuple(Task(k=k) for k in SIZES)  # alpha / r held across ranks
    for task in mix:
        out += [("size", LABELS[row], Setting(row, task, **base)) for row in ("full", "window")]
        out += [("size", f"PTE r{r}", Setting("pte", task, mix, **dict(base, rank=r, alpha=ratio * r)))
                for r in (args.rank, args.small_rank)]
    mix = tuple(Task(distance=d) for d in DISTANCES)
    for task in mix:
        out += [("distance", LABELS[row], Setting(row, task, **base)) for row in ("full", "window")]
        out.append(("distance", "PTE", Setting("pte", task, mix, **base)))
    out += [("settings", "base (the main PTE, seed 0)", Setting("pte", main, seed=args.seeds[0], **base))]
    for label, change in SWEEP:  # steps: a multiple of --steps
        fields = dict(row="pte", task=main, seed=args.seeds[0], **base)
        fields.update(change, steps=change.get("steps", 0) * args.steps)
        out.append(("settings", label, Setting(**fields)))
    twin = dict(base, alpha=8.0 * args.rank, b_init=0.01, v_scale=10.0)  # the settings that fit the twins fastest
    out += [("twins", LABELS[row], Setting(row, main, texts="twins", **twin)) for row in ROWS]
    return [entry for entry in out if entry[0] in args.tables]


def share(entries, args):
    """{run key: worker}: the runs of one adapter go to one worker (it trains it once), and the adapters are dealt out
    greedily by their cost in texts (those trained on, and 0.4 a held-out text: an evaluation costs about that)."""
    groups = {}
    for _, _, s in entries:
        groups.setdefault(s.train_key() if s.trained else s.key(), []).append(s)

    def cost(settings):
        s = settings[0]
        texts = 0 if not s.trained else (args.twin_steps * args.twins if s.texts == "twins" else
                                         (s.steps or args.steps) * args.batch)
        return texts + 0.4 * args.eval_size * len(settings)
    load, worker = [0.0] * args.jobs, {}
    for settings in sorted(groups.values(), key=cost, reverse=True):
        i = load.index(min(load))
        load[i] += cost(settings)
        worker.update((s.key(), i) for s in settings)
    return worker


# ---------------------------------------------------------------------------------------------------- the report

def mean_se(xs):
    """(mean, standard error) of a list (s.e. 0 for one value)."""
    n = len(xs)
    mean = sum(xs) / n
    return mean, (sum((x - mean) ** 2 for x in xs) / (n - 1) / n) ** 0.5 if n > 1 else 0.0


def summary(record):
    """{measure: (mean, s.e. over held-out texts)}; the other tokens' KL is token-weighted, its s.e. over texts."""
    other = sum(record["other_kl"]) / max(sum(record["other_n"]), 1)
    per_text = other_per_text(record)
    return dict(accuracy=mean_se(record["accuracy"]), digit_kl=mean_se(record["digit_kl"]),
                first=mean_se(record["first"]), first_kl=mean_se(record["first_kl"]),
                other_kl=(other, mean_se(per_text)[1]))


def pm(value, digits=3):
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def other_per_text(record):
    return [s / max(n, 1) for s, n in zip(record["other_kl"], record["other_n"])]


def differences(a, b):
    """Text by text, a - b (two rows on the same held-out texts): {measure: [differences]}."""
    pairs = dict(accuracy=(a["accuracy"], b["accuracy"]), digit_kl=(a["digit_kl"], b["digit_kl"]),
                 other_kl=(other_per_text(a), other_per_text(b)))
    return {m: [x - y for x, y in zip(*v)] for m, v in pairs.items()}


def train_seconds(ledger, setting):
    return ledger["adapters"][setting.train_key()]["seconds"] if setting.trained else 0.0


def main_table(results, seeds, ledger):
    lines = ["| row | seed | recall accuracy | KL on the recalled digits | KL on the other tokens after the first "
             "eviction | train s | eval s |", "|---|---|---|---|---|---|---|"]
    for (label, setting), result in results:
        s = summary(result)
        lines.append(f"| {label} | {setting.seed if setting.trained else '-'} | {pm(s['accuracy'])} | "
                     f"{pm(s['digit_kl'])} | {pm(s['other_kl'], 4)} | {train_seconds(ledger, setting):.0f} | "
                     f"{result['seconds']:.0f} |")
    by = {(label, setting.seed): result for (label, setting), result in results}
    lines += ["", "Paired difference PTE - LoRA_c on the same held-out texts (mean ± s.e. over texts):", "",
              "| seed | recall accuracy | KL on the recalled digits | KL on the other tokens |", "|---|---|---|---|"]
    per_seed = [differences(by[("PTE", seed)], by[("LoRA_c", seed)]) for seed in seeds]
    for seed, d in zip(seeds, per_seed):
        lines.append(f"| {seed} | {pm(mean_se(d['accuracy']))} | {pm(mean_se(d['digit_kl']))} | "
                     f"{pm(mean_se(d['other_kl']), 4)} |")
    if len(seeds) > 1:  # each text's difference averaged over the seeds, then the s.e. over texts
        pooled = {m: mean_se([sum(col) / len(col) for col in zip(*(d[m] for d in per_seed))]) for m in per_seed[0]}
        lines.append(f"| all seeds | {pm(pooled['accuracy'])} | {pm(pooled['digit_kl'])} | "
                     f"{pm(pooled['other_kl'], 4)} |")
    return lines


def curve_table(results, column, pte_label):
    """The size or distance table: a line per task, the accuracy of each row label, and PTE's two KLs."""
    labels = list(dict.fromkeys(label for (label, _), _ in results))
    lines = [f"| {column} | " + " | ".join(f"{label} accuracy" for label in labels)
             + f" | {pte_label}: KL on the digits | {pte_label}: KL on the other tokens |", "|---" * (len(labels) + 3)
             + "|"]
    for task in dict.fromkeys(setting.task for (_, setting), _ in results):
        got = {label: summary(r) for (label, s), r in results if s.task == task}
        lines.append(f"| {task.k if column == 'k' else task.distance} | "
                     + " | ".join(pm(got[label]["accuracy"]) for label in labels)
                     + f" | {pm(got[pte_label]['digit_kl'])} | {pm(got[pte_label]['other_kl'], 4)} |")
    return lines


def settings_table(results, ledger):
    lines = ["| setting | recall accuracy | KL on the recalled digits | KL on the other tokens | training loss, last "
             "5 steps | training KL on the digits, last 5 steps | train s |", "|---|---|---|---|---|---|---|"]
    for (label, setting), result in results:
        s, log = summary(result), ledger["adapters"][setting.train_key()]
        tail = lambda xs: sum(xs[-5:]) / len(xs[-5:])  # noqa: E731
        lines.append(f"| {label} | {pm(s['accuracy'])} | {pm(s['digit_kl'])} | {pm(s['other_kl'], 4)} | "
                     f"{tail(log['losses']):.4f} | {tail(log['digit_kl']):.3f} | {log['seconds']:.0f} |")
    return lines


def twins_table(results, ledger):
    lines = ["| row | first recalled digit: accuracy | its KL | all recalled digits: accuracy | their KL | train s |",
             "|---|---|---|---|---|---|"]
    for (label, setting), result in results:
        s = summary(result)
        lines.append(f"| {label} | {pm(s['first'], 2)} | {pm(s['first_kl'])} | {pm(s['accuracy'], 2)} | "
                     f"{pm(s['digit_kl'])} | {train_seconds(ledger, setting):.0f} |")
    return lines


def draw_plots(results, folder, args):
    """recall-main.svg (accuracy per row and seed), recall-size.svg and recall-distance.svg (accuracy curves)."""
    if results.get("main"):
        bars = [(f"{label}{f' s{s.seed}' if s.trained else ''}", *summary(r)["accuracy"], "")
                for (label, s), r in results["main"]]
        plot.save(plot.bar_chart(bars, "Recall accuracy on held-out facts (k = 4, 1 eviction before the recall), "
                                 "with its standard error"), folder / "recall-main.svg")
    for table, x, xlabel in (("size", "k", "digits in the fact (k)"),
                             ("distance", "distance", "evictions before the recall")):
        if not results.get(table):
            continue
        labels = list(dict.fromkeys(label for (label, _), _ in results[table]))
        series = [(label, [getattr(s.task, x) for (lab, s), _ in results[table] if lab == label],
                   [summary(r)["accuracy"][0] for (lab, _), r in results[table] if lab == label]) for label in labels]
        plot.save(plot.line_chart(series, f"SmolLM2-135M: recall accuracy against the {xlabel}", xlabel,
                                  "recall accuracy", ylim=(0, 1), xlog=True), folder / f"recall-{table}.svg")


TABLES = ("main", "size", "distance", "settings", "twins")
QUICK = dict(steps=1, batch=1, eval_size=2, twins=2, twin_steps=1, out="runs/recall-quick")
FULL = dict(steps=40, batch=4, eval_size=32, twins=2, twin_steps=20, out="runs/recall")


def parser():
    p = argparse.ArgumentParser(prog="recall.py", description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--quick", action="store_true", help=f"tiny counts ({QUICK}): every row end to end, the same tables")
    a("--model", help="SmolLM2-135M-Instruct: default $PTE_SMOLLM2, else the registry name smollm2-135m "
      "(the Hugging Face cache)")
    a("--out", type=Path, help=f"run folder; its ledger.json resumes the study (default {FULL['out']}, --quick: "
      f"{QUICK['out']})")
    a("--plots", type=Path, help="where the SVG plots go (default --out)")
    a("--steps", type=int, help=f"AdamW steps of every trained row (default {FULL['steps']})")
    a("--batch", type=int, help=f"texts per step (default {FULL['batch']}); fresh texts every step")
    a("--eval-size", type=int, help=f"held-out texts per row (default {FULL['eval_size']})")
    a("--twins", type=int, help=f"texts of the twins table, identical but for the digits (default {FULL['twins']})")
    a("--twin-steps", type=int, help=f"AdamW steps on the twins, all of them each step (default "
      f"{FULL['twin_steps']})")
    a("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1],
      help="seeds of the main comparison (initial weights and training texts)")
    a("--data-seed", type=int, default=0, help="the split of the letters into training and held-out")
    a("--tables", default=",".join(TABLES), help="which tables to run, comma-separated")
    a("--rank", type=int, default=32, help="adapter rank of the base setting")
    a("--small-rank", type=int, default=8, help="the smaller rank of the size table")
    a("--alpha", type=float, default=32.0, help="adapter scale numerator (alpha / r is held across ranks)")
    a("--targets", default="q,k,v,o", help="adapted projections")
    a("--b-init", type=float, default=0.0, help="0: LoRA's init (A random, B = 0); > 0: A = 0, B ~ N(0, b_init^2)")
    a("--lr", type=float, default=1e-3, help="AdamW learning rate")
    a("--encoder-lr", type=float, help="the thought encoder's learning rate (default --lr)")
    a("--globals", type=int, default=32, help="global tokens of the encoder")
    a("--jobs", type=int, default=2, help="worker processes that share the runs and the ledger, one torch thread "
      "each (1: this process alone, with --threads)")
    a("--worker", type=int, help="run worker I's share of the runs and stop (the command starts its workers so)")
    a("--threads", type=int, help="torch.set_num_threads")
    return p


def parse(argv):
    args = parser().parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, Path(value) if name == "out" else value)
    args.plots = args.plots or args.out
    args.tables = args.tables.split(",")
    if bad := [t for t in args.tables if t not in TABLES]:
        raise SystemExit(f"recall.py: unknown table(s) {bad}: choose from {', '.join(TABLES)}")
    if args.jobs < 1 or args.worker is not None and not 0 <= args.worker < args.jobs:
        raise SystemExit(f"recall.py: --jobs must be >= 1 and --worker in 0..{args.jobs - 1}")
    if min(args.steps, args.batch, args.twin_steps) < 1 or args.eval_size < 2 or not 2 <= args.twins <= 10:
        raise SystemExit("recall.py: --steps, --batch and --twin-steps must be >= 1, --eval-size >= 2 (a standard "
                         "error needs two), --twins between 2 and 10")
    return args


def load(name):
    """The model and tokenizer, or an exit that says how to get them."""
    name = name or os.environ.get("PTE_SMOLLM2") or "smollm2-135m"
    try:
        net, tokenizer = models.load(name), models.load_tokenizer(name)
        family = data.chat_family(models.resolve(name))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"recall.py: cannot load SmolLM2-135M-Instruct from {name!r}: {e}\nSet PTE_SMOLLM2 to its "
                         "folder, or download it: huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct")
    if family != "chatml":
        raise SystemExit(f"recall.py: {name} has the {family} chat template; the texts are written for "
                         "SmolLM2-135M-Instruct's (chatml)")
    return net, tokenizer


def report(results, args, argv, ledger):
    """Print the tables of `results` ({table: [((label, setting), result)]}) with the command and settings."""
    task = Task()
    print(f"\n$ {shlex.join(['python', 'experiments/recall.py', *argv])}\n\nSmolLM2-135M-Instruct; window "
          f"{task.window} thought slots, m = {task.m} evicted at a time; {args.eval_size} held-out texts a row; "
          f"trained rows: {args.steps} AdamW steps of {args.batch} fresh texts, rank {args.rank}, alpha "
          f"{args.alpha:g}, targets {args.targets}, b_init {args.b_init:g}, lr {args.lr:g}, encoder lr "
          f"{args.encoder_lr or args.lr:g}, {args.globals} global tokens\n")
    sections = dict(
        main=("Main comparison: k = 4 digits, 1 eviction before the recall", lambda r: main_table(r, args.seeds,
                                                                                                 ledger)),
        size=(f"Recall against the fact's size k (1 eviction before the recall; PTE trained on k = "
              f"{', '.join(map(str, SIZES))} in turn)", lambda r: curve_table(r, "k", f"PTE r{args.rank}")),
        distance=(f"Recall against the distance: evictions before the recall (k = 4; PTE trained on "
                  f"{', '.join(map(str, DISTANCES))} in turn)", lambda r: curve_table(r, "evictions", "PTE")),
        settings=("Settings tried (k = 4, 1 eviction, seed 0), one change from the base PTE each",
                  lambda r: settings_table(r, ledger)),
        twins=(f"Twins: {args.twins} texts identical but for the digits, trained on for {args.twin_steps} steps and "
               "evaluated on themselves (alpha / r = 8, b_init 0.01, W_V x10)", lambda r: twins_table(r, ledger)))
    for table, (title, make) in sections.items():
        if results.get(table):
            print("\n".join([f"### {title}", "", *make(results[table]), ""]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.threads or args.worker is not None:
        torch.set_num_threads(args.threads or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {k: getattr(args, k) for k in ("steps", "batch", "eval_size", "twins", "twin_steps", "data_seed",
                                            "globals")}
    path = args.out / "ledger.json"
    ledger = json.loads(path.read_text()) if path.exists() else dict(counts=counts, adapters={}, runs={})
    if ledger["counts"] != counts:
        raise SystemExit(f"recall.py: {path} was made with {ledger['counts']}, not {counts}: use another --out")
    t0, memo, results, entries = time.perf_counter(), {}, {}, plan(args)
    net, tokenizer = load(args.model)  # here first, so that a missing model stops the command before its workers
    if args.jobs > 1 and args.worker is None:  # the workers run the study; this process then reads it back
        workers = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--worker", str(i)])
                   for i in range(args.jobs)]
        if failed := [i for i, w in enumerate(workers) if w.wait()]:
            raise SystemExit(f"recall.py: worker(s) {failed} stopped; the same command resumes the study")
    if args.worker is not None:
        mine = share(entries, args)
        for _, _, setting in entries:
            if mine[setting.key()] == args.worker:
                run(net, tokenizer, setting, args, ledger, memo)
        return
    for table, label, setting in entries:
        results.setdefault(table, []).append(((label, setting), run(net, tokenizer, setting, args, ledger, memo)))
    report(results, args, argv, ledger)
    draw_plots(results, args.plots, args)
    spent = sum(a["seconds"] for a in ledger["adapters"].values()) + sum(r["seconds"] for r in ledger["runs"].values())
    print(f"time: {spent:.0f} s of training and evaluation in the ledger ({len(ledger['adapters'])} adapters, "
          f"{len(ledger['runs'])} evaluations), {time.perf_counter() - t0:.0f} s in this command; "
          + (f"{args.jobs} workers of one thread" if args.jobs > 1 else f"{torch.get_num_threads()} thread(s)")
          + f"; plots in {args.plots}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too; the ledger holds every finished run
        print("recall.py: stopped; the same command resumes the study", file=sys.stderr)
        raise SystemExit(130) from None
