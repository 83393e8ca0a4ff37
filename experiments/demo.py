"""The offline CPU demo: a tiny model learns a synthetic task where thinking helps, then
AnytimeReasoner and GRPO train it from the same start, same steps, same questions.

    python train_small.py --demo             # minutes on a CPU (the README gives its time); --help shows its values
    python train_small.py --demo --seed 1    # another warm-up, other training questions

train_small.py runs this file's main_demo with the demo's flags; the ablation
(experiments/ablation.py) runs every preset on the same task. What it shows: docs/demo.md.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also as a plain script
import anytime_reasoner as ar  # noqa: E402
import train_small as ts  # noqa: E402
from train_small import Args  # noqa: E402

# The demo task: count the steps from one letter to another along a fixed cycle
# of 12 letters. "d>i" is answered by thinking "1e2f3g4h5i" (a step number and
# the next letter, until the target) and then \boxed{5}. Each thinking token is
# easy (the step before plus one) but the count cannot be read off the question
# by a tiny model, so an answer is only right once the thinking has reached the
# target. Warm-up traces start with a random amount of filler ("~"), so cutting
# the thinking at a small budget often loses the count. The anytime objective
# should learn to drop the filler; final-answer GRPO has no reason to (every
# trace finishes within the largest budget).
DEMO_NODES = "abcdefghijkl"
DEMO_FILLER_MAX = 8  # <= 8 filler + 2 x 7 steps + </think> = 23 <= 24, the last budget


def demo_problem(rng: random.Random) -> dict:
    start, steps = rng.randrange(12), rng.randint(2, 7)
    letters = [DEMO_NODES[(start + k) % 12] for k in range(steps + 1)]
    path = "".join(f"{k}{letters[k]}" for k in range(1, steps + 1))
    return {"question": f"{letters[0]}>{letters[-1]}", "answer": str(steps), "path": path}


def demo_prompt(question: str) -> str:
    return question + "\n<think>\n"


def tiny_tokenizer(think_end_special: bool = True):
    """A character-level tokenizer built in code (no download). `</think>` is one
    special token, like Qwen3/DeepSeek-R1, or 8 ordinary characters, like Qwen2.5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?+-*/=()[]{}<>\\$%#_^'\"|&~"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                unk_token="<unk>")
    t.add_tokens(["<think>", "**Final Answer**", "\\boxed{", "..."])  # whole words, not characters
    if think_end_special:
        t.add_special_tokens({"additional_special_tokens": ["</think>"]})
    return t


def tiny_model(tokenizer, hidden: int = 128, layers: int = 2, seed: int = 0, attn: str = "sdpa"):
    """A random-initialised Qwen2 causal LM of any size, built from a config (no download)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.eos_token_id, attn_implementation=attn)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def demo_warmup(model, tokenizer, steps: int, seed: int, device, log=print):
    """Supervised warm-up so the tiny model can produce the format: filler, the chain,
    </think>, **Final Answer**, \\boxed{end}. A third of the examples are cut short
    with the "..." insert and answer with the last node reached (a guess)."""
    rng = random.Random(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        seqs, starts = [], []
        for _ in range(32):
            pb = demo_problem(rng)
            think = "~" * rng.randint(0, DEMO_FILLER_MAX) + pb["path"]
            if rng.random() < 1 / 3:
                cut = rng.randint(0, len(think))
                seen = [c for c in think[:cut] if c.isdigit()]
                guess = seen[-1] if seen else str(rng.randint(1, 7))
                body = ar.encode(tokenizer, think[:cut] + ar.TRUNCATED_INSERT + "\\boxed{" + guess + "}")
            else:
                body = ar.encode(tokenizer, think + ar.THINK_END + ar.CLOSED_INSERT
                                 + "\\boxed{" + pb["answer"] + "}")
            prompt = ar.encode(tokenizer, demo_prompt(pb["question"]))
            seqs.append(prompt + body + [tokenizer.eos_token_id])
            starts.append(len(prompt))
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), T), -100)
        for i, (s, p) in enumerate(zip(seqs, starts)):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, p:len(s)] = torch.tensor(s[p:])
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"warm-up {step:4d}/{steps}  loss {loss.item():.3f}")
    model.eval()


def demo_data(args: Args) -> tuple[list[dict], list[dict]]:
    """The demo's training problems (drawn from the seed) and its held-out ones (fixed)."""
    rng = random.Random(args.seed)
    train_set = [demo_problem(rng) for _ in range(20000)]
    eval_set = [demo_problem(random.Random(10_000 + i)) for i in range(args.eval_size)]
    return train_set, eval_set


def warmed_up_model(args: Args, tokenizer, device, folder: str) -> str:
    """The folder of the warmed-up model for args.seed, made once and then reused. It is written
    under a temporary name and renamed when complete, so a warm-up stopped midway is never used."""
    path = os.path.join(folder, f"warmup-seed{args.seed}-{args.warmup_steps}steps")
    if os.path.isdir(path):
        print(f"using the warmed-up model in {path}")
        return path
    model = tiny_model(tokenizer, seed=args.seed).to(device)
    print(f"tiny model: {ts.millions(model)} parameters")
    demo_warmup(model, tokenizer, args.warmup_steps, args.seed, device)
    if os.path.isdir(path + ".tmp"):
        shutil.rmtree(path + ".tmp")
    with ts.no_hf_bars():
        model.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def preset_args(args: Args, name: str) -> Args:
    """args with preset `name`'s algorithm and its evenly spaced budgets up to args.max_think."""
    preset = ar.PRESETS[name]
    return Args(**{**asdict(args), **{k: v for k, v in asdict(preset).items() if k != "num_budgets"},
                   "preset": name, "budgets": ar.evenly_spaced_budgets(args.max_think, preset.num_budgets)})


def is_demo_file(name: str) -> bool:
    """Files that one demo run writes into its folder (not the warm-ups, which are shared)."""
    return (name in ("demo_results.json", "anytime_accuracy.png", "anytime_accuracy.txt")
            or name.startswith(("metrics-", "eval-", "ckpt-")))


def publish_demo(staging: str, out: str):
    """Replace the demo in `out` by the finished one in `staging`, all files or none: the old
    demo's files (those of any preset) move out first, its demo_results.json before the rest,
    and the new demo's demo_results.json comes in last. A folder holds a finished demo exactly
    when it holds a demo_results.json."""
    old = os.path.join(out, "previous")
    if os.path.isdir(old):
        shutil.rmtree(old)
    os.makedirs(old)
    for name in sorted(filter(is_demo_file, os.listdir(out)), key=lambda n: n != "demo_results.json"):
        os.replace(os.path.join(out, name), os.path.join(old, name))
    for name in sorted(os.listdir(staging), key=lambda n: n == "demo_results.json"):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    shutil.rmtree(old)


def cpu_threads(threads: int) -> str:
    """Set torch's CPU threads (the demo: not one per core, the result depends on the count); 0 picks
    2 when two cores are free (1-minute load average below cores - 1.5), else 1. Returns what to say."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    n = threads or (2 if load < cores - 1.5 else 1)
    torch.set_num_threads(n)
    why = "--threads" if threads else (f"{'quiet' if n == 2 else 'busy'} machine: 1-minute load {load:.2f} "
                                       f"{'<' if n == 2 else '>='} {cores - 1.5:g} = {cores} cores - 1.5")
    return f"{n} CPU thread{'s' * (n > 1)} ({why}; 1 and 2 give the same result)"


def main_demo(args: Args, device):
    """Warm up a tiny model, then train AnytimeReasoner and GRPO from the same start, same steps.

    The runs write into out_dir/partial. Only once both are done do their files replace the
    previous demo's in out_dir (which needs --overwrite, checked before anything runs): a demo
    stopped early never destroys a finished one. The warm-up is kept in out_dir and reused by
    the next demo of the same seed."""
    print(cpu_threads(args.threads))
    ts.seed_everything(args.seed)
    tokenizer = tiny_tokenizer()
    train_set, eval_set = demo_data(args)
    os.makedirs(args.out_dir, exist_ok=True)
    staging = os.path.join(args.out_dir, "partial")
    if os.path.isdir(staging):  # what a stopped demo left (the demo does not resume), and anything else there
        shutil.rmtree(staging)
    start = warmed_up_model(args, tokenizer, device, args.out_dir)
    if os.path.isfile(os.path.join(args.out_dir, "demo_results.json")):
        print(f"{args.out_dir} holds a finished demo; --overwrite replaces it once this one is done (in {staging})")
    runs = {args.preset: args, "grpo": preset_args(args, "grpo")} if args.preset != "grpo" else {"grpo": args}
    results = {}
    for name, run_args in runs.items():
        from transformers import AutoModelForCausalLM
        ts.seed_everything(args.seed)
        with ts.no_hf_bars():
            model = AutoModelForCausalLM.from_pretrained(start).to(device)
        print(f"\n=== {name}: S={len(run_args.budgets)} budgets {run_args.budgets}, A={run_args.num_summaries}, "
              f"prior {run_args.prior}, thinking {run_args.thinking_method}, summary {run_args.summary_method}")
        before, results[name] = ts.train(Args(**{**asdict(run_args), "out_dir": staging}), model, tokenizer,
                                      train_set, eval_set, demo_prompt, device, tag="-" + name,
                                      stop_hint="the demo does not resume: run `" + ts.demo_command(args.out_dir)
                                      + "` again (it reuses the warm-up)")
        results = {"before": before, **results} if "before" not in results else results
    title = ts.figure_title("tiny demo model", " vs ".join(runs), len(eval_set), args.eval_temperature)
    print("\n" + title.replace("\n", ": ") + "\n" + ts.format_table(results))
    figure = ts.plot_curves(results, os.path.join(staging, "anytime_accuracy.png"), title)  # prints a text chart
    ts.write_json(os.path.join(staging, "demo_results.json"), {"seed": args.seed, "steps": args.steps, **results})
    publish_demo(staging, args.out_dir)
    print(f"wrote {args.out_dir}: demo_results.json, {os.path.basename(figure)}, and per run metrics-*.jsonl, "
          f"eval-*.jsonl, ckpt-*")
    return results
