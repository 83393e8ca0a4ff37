"""The paper's ablation at toy scale: every preset, several seeds, on the demo task.

    python -m experiments.ablation                 # 8 presets x 3 seeds, into out-ablation/ (time: docs/ablation.md)
    python -m experiments.ablation --seeds 5       # add seeds 3 and 4 to the same folder
    python -m experiments.ablation --steps 1 --warmup-steps 3 --questions-per-step 4   # a smoke run

Each seed warms up one tiny model (train_small.py's demo); its eight presets all start from
it and train on the same questions for the same steps with the demo's settings, and each run
is evaluated once, after its last step. Then one table (ablation_table.md), the results
(ablation_results.json) and two figures: accuracy against budget per preset, and the
variance of the thinking advantage, Var[R - V] / Var[R], for V = V1, V2 and BRPO. A finished
run keeps its folder (seedN/preset/, result.json written last) and is not redone when the
ablation runs again: on a finished folder the same command only redraws the table and figures.
Any flag of `train_small.py --demo` may be given (--steps, --lr, ...),
but not those that change a preset. Results and how to read them: docs/ablation.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also as a plain script
import anytime_reasoner as ar  # noqa: E402
import train_small as ts  # noqa: E402
from train_small import Args, die  # noqa: E402

# The paper's runs in the order of its argument: GRPO, each ingredient added to it, then
# AnytimeReasoner with each prior.
ABLATION = ("grpo", "grpo+linear", "grpo+decouple", "grpo+vr", "grpo+vr+decouple", "ar-base", "ar-linear",
            "ar-uniform")
# Flags that do not make another ablation: where it is written, its seeds, whether to start afresh.
NOT_SETTINGS = ("out_dir", "overwrite", "resume", "seed")
# The variance figure: this many traces for each of this many held-out questions; a budget
# reached by fewer traces than one question's has no ratio (too few for a variance).
VARIANCE_QUESTIONS, VARIANCE_TRACES = 32, 32


def ablation_settings(args: Args) -> dict:
    return {k: v for k, v in asdict(args).items() if k not in NOT_SETTINGS}


def variance_on_rollouts(model, tokenizer, eval_set: list[dict], args: Args) -> dict:
    """The paper's variance figure for one model: VARIANCE_TRACES traces for each of the first
    VARIANCE_QUESTIONS held-out questions, sampled at the training temperature, cut at 4 budgets
    with 4 summaries each (ar-uniform's rollout); Var[R - V] / Var[R] per budget for V = V1, V2
    and BRPO under the uniform prior, over the traces that reach each segment (`reaching`);
    None where fewer than VARIANCE_TRACES traces reach it or their returns are all equal."""
    budgets = ar.evenly_spaced_budgets(args.max_think, 4)
    questions = eval_set[:VARIANCE_QUESTIONS]
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():  # its own random stream, as the evaluations
        torch.manual_seed(args.seed + 54321)
        ro = ar.rollout(model, tokenizer, [ts.demo_prompt(q["question"]) for q in questions], budgets,
                        VARIANCE_TRACES, 4, args.temperature, args.summary_max_tokens, args.think_batch,
                        args.summary_batch)
    r = ar.pooled_scores(ar.score_rollout(ro, [q["answer"] for q in questions]), ro.prompt_index)  # B,G,S
    var = ar.variance_diagnostics(r.double(), ar.budget_prior("uniform", budgets).double(), ro.think_len, budgets)
    reaching = (ro.think_len[..., None] > torch.tensor([0] + budgets[:-1])).sum((0, 1))  # S
    return {"budgets": budgets, "questions": len(questions), "traces": VARIANCE_TRACES, "reaching": reaching.tolist(),
            **{k[len("var_ratio_"):]: [round(x, 4) if math.isfinite(x) and n >= VARIANCE_TRACES else None
                                       for x, n in zip(v.tolist(), reaching.tolist())]
               for k, v in var.items() if k.startswith("var_ratio_")}}


def ablation_run(args: Args, name: str, start: str, folder: str, train_set, eval_set, tokenizer, device) -> dict:
    """One preset from the warm-up in `start`, into folder/name; its result.json, written last,
    marks it finished. Compute is reported beside the score: seconds (wall and CPU; with
    --threads 1 the CPU seconds are about the wall seconds of a quiet machine) and tokens generated."""
    from transformers import AutoModelForCausalLM
    run_dir = os.path.join(folder, name)
    if os.path.isdir(run_dir):  # stopped midway: runs do not resume, start it again
        shutil.rmtree(run_dir)
    run_args = Args(**{**asdict(ts.preset_args(args, name)), "out_dir": run_dir, "eval_every": args.steps})
    ts.seed_everything(args.seed)
    with ts.no_hf_bars():
        model = AutoModelForCausalLM.from_pretrained(start).to(device)
    print(f"\n=== seed {args.seed}, {name}: S={len(run_args.budgets)} budgets {run_args.budgets}, "
          f"A={run_args.num_summaries}, prior {run_args.prior}, thinking {run_args.thinking_method}, "
          f"summary {run_args.summary_method}", flush=True)
    wall, cpu = time.time(), time.process_time()
    before, after = ts.train(run_args, model, tokenizer, train_set, eval_set, ts.demo_prompt, device,
                             stop_hint="this run starts afresh when the ablation runs again")
    wall, cpu = time.time() - wall, time.process_time() - cpu
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    result = {"preset": name, "seed": args.seed, "steps": len(steps), "before": before, "after": after,
              "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
              "step_seconds": round(sum(m["s_per_step"] for m in steps), 1),
              "generated_tokens": sum(m["gen_tokens"] for m in steps),   # thinking + summaries
              "loadavg": [round(x, 2) for x in os.getloadavg()]}  # how busy the machine was
    ts.write_json(os.path.join(run_dir, "result.json"), result)
    return result


def summarise_ablation(runs: list[dict], variance: dict[str, list[dict]]) -> dict:
    """Per preset over seeds: accuracy per budget (mean), anytime score (mean, min, max),
    thinking tokens, seconds and tokens per run (mean); the variance figure's ratios (mean,
    min, max over seeds) for each model measured (variance: label -> one result per seed)."""
    def mean(xs):
        return sum(xs) / len(xs)

    def spread(lists):  # per budget: mean, min, max over seeds (None where a seed has none)
        cols = [[x for x in col if x is not None and math.isfinite(x)] for col in zip(*lists)]
        return {"mean": [round(mean(c), 4) if c else None for c in cols],
                "min": [min(c) if c else None for c in cols], "max": [max(c) if c else None for c in cols]}

    rows = {"before": [r["before"] for r in runs if r["preset"] == ABLATION[0]]}
    rows.update({name: [r["after"] for r in runs if r["preset"] == name] for name in ABLATION})
    table = {}
    for name, evals in rows.items():
        scores = [e["anytime_score"] for e in evals]
        table[name] = {"budgets": evals[0]["budgets"],
                       "accuracy": [round(mean(c), 4) for c in zip(*(e["accuracy"] for e in evals))],
                       "anytime_score": round(mean(scores), 4), "min": min(scores), "max": max(scores),
                       "mean_think_len": round(mean([e["mean_think_len"] for e in evals]), 1), "seeds": len(evals)}
        done = [r for r in runs if r["preset"] == name]
        for k in ("wall_seconds", "cpu_seconds", "step_seconds", "generated_tokens"):
            if done and name != "before":
                table[name][k] = round(mean([r[k] for r in done]), 1)
    variance = {label: {"budgets": v[0]["budgets"], **{k: spread([x[k] for x in v]) for k in ("v1", "v2", "brpo")},
                        "reaching": [sum(x["reaching"][i] for x in v) / len(v) for i in range(len(v[0]["budgets"]))]}
                for label, v in variance.items() if v}
    return {"table": table, "variance": variance}


def ablation_table(summary: dict) -> str:
    """The table as Markdown: budgets as columns, one row per preset."""
    table = summary["table"]
    grid = table["before"]["budgets"]
    lines = ["| run | " + " | ".join(map(str, grid)) + " | anytime score: mean (min–max) | thinking tokens "
             "| wall s / run | CPU s / run | tokens generated / run |",
             "|---" * (len(grid) + 6) + "|"]
    for name, t in table.items():
        tokens = t.get("generated_tokens", 0)
        compute = [f"{t['wall_seconds']:.0f}", f"{t['cpu_seconds']:.0f}",
                   f"{tokens / 1e3:.0f}k" if tokens >= 1e4 else f"{tokens:.0f}"] if "wall_seconds" in t else ["–"] * 3
        lines.append(f"| {name} | " + " | ".join(f"{a:.2f}" for a in t["accuracy"])
                     + f" | **{t['anytime_score']:.3f}** ({t['min']:.3f}–{t['max']:.3f}) | {t['mean_think_len']:.1f} | "
                     + " | ".join(compute) + " |")
    for label, v in summary["variance"].items():
        lines += ["", f"Var[R - V] / Var[R] per budget, {label} (mean over seeds, min–max):", "",
                  "| baseline | " + " | ".join(map(str, v["budgets"])) + " |", "|---" * (len(v["budgets"]) + 1) + "|"]
        for k in ("v1", "v2", "brpo"):
            cells = [f"{m:.3f} ({lo:.3f}–{hi:.3f})" if m is not None else "–"
                     for m, lo, hi in zip(v[k]["mean"], v[k]["min"], v[k]["max"])]
            lines.append(f"| {k.upper() if k != 'brpo' else 'BRPO'} | " + " | ".join(cells) + " |")
        lines.append("| traces reaching the segment | " + " | ".join(f"{n:.0f}" for n in v["reaching"]) + " |")
    return "\n".join(lines)


def same_runs(names) -> dict[str, str]:
    """Each name -> its label: presets with the same settings are one run, named together
    ("grpo+vr+decouple = ar-base"); the first of them keeps the label, the others get ""."""
    groups = {}
    for name in names:
        groups.setdefault(ar.PRESETS.get(name, name), []).append(name)
    return {name: " = ".join(g) + " (same run)" * (len(g) > 1) if name == g[0] else ""
            for g in groups.values() for name in g}


def plot_ablation(summary: dict, folder: str, title: str) -> list[str]:
    """ablation_curves (accuracy against budget: GRPO plus each ingredient, and AnytimeReasoner with each
    prior; seeds' mean) and ablation_variance (Var[R - V] / Var[R] per budget, seeds' mean with min-max
    bars): PNGs with matplotlib, else text charts. Presets with the same settings are drawn once, named
    together. Returns the paths written."""
    table, variance = summary["table"], summary["variance"]
    label, seeds = same_runs(table), table["before"]["seeds"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        width = 40
        lines = [title, "(a text chart; pip install matplotlib for a PNG)"]
        for name, t in table.items():
            if label[name]:
                lines.append(f"{label[name]} (anytime {t['anytime_score']:.3f})")
                lines += [f"  {b:>6} |{'#' * round(a * width):<{width}}| {a:.3f}"
                          for b, a in zip(t["budgets"], t["accuracy"])]
        curves = os.path.join(folder, "ablation_curves.txt")
        with open(curves, "w") as f:
            f.write("\n".join(lines) + "\n")
        lines = [f"Var[R - V] / Var[R] per budget (mean over seeds; {VARIANCE_TRACES} traces per question; "
                 "bars end at 1.5)",
                 "(a text chart; pip install matplotlib for a PNG)"]
        for name, v in variance.items():
            lines.append(name)
            for i, b in enumerate(v["budgets"]):  # budget by budget, the three baselines side by side
                lines += [f"  {b:>4} {k:>4} |{'#' * round(min(v[k]['mean'][i], 1.5) * width):<{round(1.5 * width)}}| "
                          f"{v[k]['mean'][i]:.3f}" for k in ("v1", "v2", "brpo") if v[k]["mean"][i] is not None]
        path = os.path.join(folder, "ablation_variance.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return [curves, path]
    plt.rcParams.update({"font.size": 12})
    # two panels, the paper's two questions: what each ingredient adds to GRPO, and which prior is best
    panels = {"GRPO plus one ingredient": [n for n in table if n in ("before", "grpo") or n.startswith("grpo+")],
              "AnytimeReasoner with each prior": [n for n in table if n in ("before", "grpo") or n.startswith("ar-")]}
    firsts = [n for n in table if label[n]]                              # one colour, marker per run
    colours = ["0.2"] + [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # not tab10's grey
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 7), sharey=True)
    for ax, (panel, names) in zip(axes, panels.items()):
        for name in names:
            t = table[name]
            run = next(m for m in firsts if name in label[m].split(" (")[0].split(" = "))
            k = firsts.index(run)
            style = ":" if name == "before" else ["-", "--", "-."][k % 3]
            ax.plot(t["budgets"], t["accuracy"], style, marker="os^Dv<>p*"[k % 9], color=colours[k % len(colours)],
                    markersize=6, lw=3.5 if style == "-" else 2, zorder=2 if style == "-" else 3,  # both show
                    label=f"{label[run]}: {t['anytime_score']:.3f} ({t['min']:.3f}–{t['max']:.3f})")
        ax.set_title(panel)
        ax.set_xlabel("thinking budget (tokens)")
        ax.set_xticks(table["before"]["budgets"])
        ax.set_ylabel(f"accuracy (mean over {seeds} seeds)")
        ax.tick_params(labelleft=True)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False,
                  title=f"anytime score: mean (min–max over {seeds} seeds)")
    fig.suptitle(title.replace(": ", ":\n", 1))
    fig.tight_layout()
    curves = os.path.join(folder, "ablation_curves.png")
    fig.savefig(curves, dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(variance), figsize=(6.25 * len(variance), 5.5), sharey=True, squeeze=False)
    for ax, (name, v) in zip(axes[0], variance.items()):
        for k, baseline in (("v1", "V1"), ("v2", "V2"), ("brpo", "BRPO")):
            keep = [i for i, m in enumerate(v[k]["mean"]) if m is not None]
            m = [v[k]["mean"][i] for i in keep]
            err = [[max(0, m[j] - v[k]["min"][i]) for j, i in enumerate(keep)],  # the mean is rounded
                   [max(0, v[k]["max"][i] - m[j]) for j, i in enumerate(keep)]]
            ax.errorbar([v["budgets"][i] for i in keep], m, yerr=err, marker="o", markersize=5, capsize=4, lw=2,
                        label=baseline)
        for i, b in enumerate(v["budgets"]):   # a segment without a ratio: say why
            if all(v[k]["mean"][i] is None for k in ("v1", "v2", "brpo")):
                ax.text(b, 1.6, f"no ratio:\n{v['reaching'][i]:.0f} traces\nreach it", ha="center", va="center",
                        fontsize=11, color="0.3")
        ax.axhline(1, color="grey", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xticks(v["budgets"])
        ax.set_xlim(v["budgets"][0] - 3, v["budgets"][-1] + 3)
        ax.set_xlabel("thinking segment (its last token)")
        ax.set_ylabel("Var[R - V] / Var[R]  (log scale)")
        ax.tick_params(labelleft=True)
        ax.grid(alpha=0.3, which="both")
        ax.legend(title="baseline V")
    lo, hi = axes[0][0].get_ylim()      # the y axis is shared: ticks as plain numbers (0.5, 2), not 10^0
    ticks = [y for y in ((0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if hi / lo > 10 else (0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3))
             if lo <= y <= hi]
    if len(ticks) < 3:                  # a narrow range (a smoke run's)
        ticks = [y for y in matplotlib.ticker.MaxNLocator(4).tick_values(lo, hi) if lo <= y <= hi]
    axes[0][0].set_yticks(ticks, [f"{y:g}" for y in ticks])
    axes[0][0].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].set_ylim(lo, hi)
    fig.text(0.01, 0.01, f"Points: mean over {seeds} seeds; bars: min to max over the seeds. Below the grey line "
             "(1), the baseline lowers the variance of the thinking's\nreturn R; above it, it adds variance. "
             f"{VARIANCE_TRACES} traces for each of {VARIANCE_QUESTIONS} held-out questions, uniform prior.",
             va="bottom")
    fig.suptitle("Var[R - V] / Var[R] per thinking segment: how much each baseline V lowers the variance of "
                 "the return")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = os.path.join(folder, "ablation_variance.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [curves, path]


def prepare_ablation_folder(args: Args):
    """A folder holds one ablation: its settings are in ablation.json, and an ablation with other
    settings is refused (one line) unless --overwrite, which removes what an ablation writes
    (seedN/ folders, ablation* files) and nothing else."""
    out = args.out_dir
    manifest = os.path.join(out, "ablation.json")
    settings = ablation_settings(args)
    if os.path.isfile(manifest) and not args.overwrite:
        with open(manifest) as f:
            held = json.load(f)["settings"]
        differ = [f"--{k.replace('_', '-')} {held.get(k)} there, {settings.get(k)} now"
                  for k in sorted(set(held) | set(settings)) if held.get(k) != settings.get(k)]
        if differ:
            die(f"{out} holds an ablation with other settings ({'; '.join(differ)}); choose another "
                f"--out-dir, or add --overwrite to start afresh there")
    if args.overwrite:  # only what an ablation writes: never the rest of the folder
        for name in os.listdir(out) if os.path.isdir(out) else []:
            path = os.path.join(out, name)
            if name.startswith("seed") and name[4:].isdigit() and os.path.isdir(path):
                shutil.rmtree(path)
            elif name.startswith("ablation") and os.path.isfile(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(manifest):
        import transformers
        ts.write_json(manifest, {"settings": settings, "torch": torch.__version__,
                              "transformers": transformers.__version__})


def main_ablation(args: Args, num_seeds: int, device):
    """Every preset of the paper, for seeds --seed .. --seed + n - 1, each seed's presets from one
    warm-up with the same questions and steps; then one table and two figures. A finished run
    keeps its folder (seedN/preset/ with result.json, written last) and is not redone when the
    ablation runs again; a folder holds the runs of one ablation only (ablation.json)."""
    print(ts.cpu_threads(args.threads))
    prepare_ablation_folder(args)
    out = args.out_dir
    tokenizer = ts.tiny_tokenizer()
    seeds = list(range(args.seed, args.seed + num_seeds))
    runs, variance, kept = [], {"warmed-up model": [], "after ar-uniform": []}, 0
    t0 = time.time()
    for seed in seeds:
        seed_args = Args(**{**asdict(args), "seed": seed})
        folder = os.path.join(out, f"seed{seed}")
        os.makedirs(folder, exist_ok=True)
        train_set, eval_set = ts.demo_data(seed_args)
        start = ts.warmed_up_model(seed_args, tokenizer, device, folder)
        for name in ABLATION:
            path = os.path.join(folder, name, "result.json")
            if os.path.isfile(path):
                with open(path) as f:
                    runs.append(json.load(f))
                kept += 1
                continue
            try:
                runs.append(ablation_run(seed_args, name, start, folder, train_set, eval_set, tokenizer, device))
            except SystemExit as e:  # Ctrl-C: train() has said so
                if e.code == 130:
                    print(f"the ablation continues where it stopped (the finished runs are kept) when run "
                          f"again: python -m experiments.ablation {' '.join(sys.argv[1:])}".rstrip())
                raise
        # the variance figure, on the warmed-up model and on the model ar-uniform trained
        for label, name, model_dir in (("warmed-up model", "warmup", start),
                                       ("after ar-uniform", "ar-uniform", os.path.join(folder, "ar-uniform", "ckpt"))):
            path = os.path.join(folder, f"variance-{name}.json")
            if not os.path.isfile(path):
                from transformers import AutoModelForCausalLM
                with ts.no_hf_bars():
                    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
                ts.write_json(path, variance_on_rollouts(model, tokenizer, eval_set, seed_args))
            with open(path) as f:
                variance[label].append(json.load(f))
    if kept:
        print(f"\nkept {kept} runs finished earlier in {out}")
    summary = summarise_ablation(runs, variance)
    title = (f"tiny demo model, {len(seeds)} seeds x {len(ABLATION)} presets, {args.steps} steps: "
             f"accuracy on {args.eval_size} held-out questions, temperature {args.eval_temperature}")
    table = ablation_table(summary)
    print("\n" + title + "\n\n" + table)
    with open(os.path.join(out, "ablation_table.md"), "w") as f:
        f.write(title + "\n\n" + table + "\n")
    ts.write_json(os.path.join(out, "ablation_results.json"), {"seeds": seeds, **summary})
    figures = plot_ablation(summary, out, title)
    print(f"\nwrote {os.path.join(out, 'ablation_table.md')}, ablation_results.json, "
          + ", ".join(os.path.basename(p) for p in figures) + f" ({time.time() - t0:.0f} s)")
    return summary

# Flags that change a preset, refused here: the ablation runs every preset as it is.
PRESET_FLAGS = ("--preset", "--budgets", "--prior", "--num-summaries", "--thinking-method", "--summary-method",
                "--eval-every")


def parse_args(argv=None) -> tuple[Args, int]:
    """(the demo's Args with the flags given, the number of seeds). Refused: what changes a preset."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Every other flag is train_small.py's (python train_small.py --help); "
                                "the demo's values are the defaults, --out-dir is out-ablation.")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds --seed, --seed + 1, ... [default: 3]")
    own, rest = p.parse_known_args(argv)
    for word in rest:
        if word.split("=")[0] in PRESET_FLAGS + ("--demo", "--resume", "--eval-only"):
            die(f"the ablation runs every preset as it is and evaluates after the last step; drop {word.split('=')[0]}")
    if own.seeds < 1:
        die(f"--seeds must be at least 1, got {own.seeds}")
    return ts.parse_args(["--demo", "--out-dir", "out-ablation", *rest]), own.seeds


def main(argv=None):
    args, seeds = parse_args(argv)
    ts.check_out_dir(args)
    return main_ablation(args, seeds, ts.pick_device(args.device))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
