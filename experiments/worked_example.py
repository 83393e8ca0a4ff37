"""BRPO with numbers: every quantity of one hand-made rollout, computed by anytime_reasoner.py.

    python -m experiments.worked_example                  # the tables, on any CPU
    python -m experiments.worked_example --figure a.png   # and one trace as a strip of tokens (.txt without matplotlib)

One question, G = 4 traces, S = 4 budgets (4, 8, 12, 16 tokens), A = 2 summaries, uniform prior.
Trace 0 is right early, trace 1 becomes right late, trace 2 is never right, trace 3 closes its
thinking (`</think>`) after 10 tokens, so its budgets 12 and 16 share one summary prompt. The
numbers worked by hand, and the figure: docs/worked-example.md.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also as a plain script
import anytime_reasoner as ar  # noqa: E402

BUDGETS, G, A = [4, 8, 12, 16], 4, 2
THINK_LEN, WHY = [16, 16, 16, 10], ["max", "max", "max", "think"]   # trace 3 closes with </think>
SCORES = torch.tensor([[[[1, 0], [1, 1], [1, 1], [1, 1]],     # right early
                        [[0, 0], [0, 0], [0, 1], [1, 1]],     # right late
                        [[0, 0], [0, 0], [0, 0], [0, 0]],     # never right
                        [[0, 0], [1, 0], [1, 1], [1, 0]]]]).float()  # closed at 10: budgets 12, 16 pooled


def worked_example() -> dict:
    """Every table of the printout, each from the library's own function: name -> tensor."""
    index = torch.tensor([[ar.summary_prompts(n, why, BUDGETS)[2] for n, why in zip(THINK_LEN, WHY)]])  # 1,G,S
    prior = ar.budget_prior("uniform", BUDGETS)
    r = ar.pooled_scores(SCORES, index)
    R = ar.returns_to_go(r, prior)
    return {"scores": SCORES[0], "prompt_index": index[0], "r": r[0], "prior": prior, "R": R[0],
            "V1": ar.v1_baseline(r, prior)[0], "V2": ar.v2_baseline(R)[0], "baseline": ar.brpo_baseline(r, prior)[0],
            "brpo": ar.thinking_advantages(r, prior, "brpo")[0],
            "grpo": ar.thinking_advantages(r, ar.budget_prior("base", BUDGETS), "grpo")[0],
            "summary_adv": ar.summary_advantages(SCORES, "brpo", index)[0]}


def packed_row(t: dict, g: int = 3) -> tuple[list[str], dict, torch.Tensor, torch.Tensor]:
    """Trace g as one packed training row, in made-up tokens: (tokens, the row's fields, its attention
    mask [T, T] as booleans, each token's advantage [T])."""
    cuts, trunc, _ = ar.summary_prompts(THINK_LEN[g], WHY[g], BUDGETS)
    think = [f"t{i}" for i in range(1, THINK_LEN[g])] + ["</think>" if WHY[g] == "think" else f"t{THINK_LEN[g]}"]
    answers = ["\\boxed{5}", "\\boxed{7}"]  # made up: what a summary says does not change its advantage
    names = ["Q:", "<think>"] + think + ["...</think>", "Final:"] + answers + ["EOS"]
    ids = {name: i for i, name in enumerate(names)}
    inserts = [[ids["...</think>"], ids["Final:"]] if tr else [ids["Final:"]] for tr in trunc]
    summaries = [[[ids[answers[int(t["scores"][g, s, a])]], ids["EOS"]] for a in range(A)] for s in range(len(BUDGETS))]
    row = ar.pack_trace([ids["Q:"], ids["<think>"]], [ids[x] for x in think], BUDGETS, cuts, inserts, summaries)
    packed = ar.Packed(*(torch.tensor([row[k]]) for k in ("input_ids", "position_ids", "prefix_len", "block_start",
                                                          "adv_index")), len(BUDGETS), A)
    mask = ar.packed_attention_mask(packed.prefix_len, packed.block_start)[0, 0] == 0
    adv = ar.token_advantages(packed, t["brpo"][g:g + 1], t["summary_adv"][g:g + 1])[0]
    return [names[i] for i in row["input_ids"]], row, mask, adv


def table(title: str, x: torch.Tensor, rows: str = "trace", cols=BUDGETS) -> str:
    """A tensor [rows, S] or [rows, S, A] as text: one line per row, one column per budget."""
    lines = [title, f"{'':>9}" + "".join(f"{f'b={b}':>16}" for b in cols)]
    for i, row in enumerate(x):
        cells = ["  ".join(f"{v:6.3f}" for v in c.reshape(-1).tolist()) for c in row]
        lines.append((f"{rows} {i:<3}" if len(x) > 1 else rows).rjust(9) + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def render(t: dict) -> str:
    tokens, row, mask, adv = packed_row(t)
    out = [table("summary scores [g, s, a] (A = 2 per budget; trace 3's budgets 12 and 16 share a prompt)",
                 t["scores"]),
           table("r[g, s] = mean score of the summaries of the prompt budget s uses (pooled)", t["r"]),
           table("p[s] = 1 / S (uniform prior)", t["prior"][None], rows="p"),
           table("R[g, s] = sum_{k>=s} p[k] r[g, k]   (return of thinking segment (b_{s-1}, b_s])", t["R"]),
           table("V1[g, s] = prev[g, s] * sum_{k>=s} p[k],  prev = sum_{k<s} 2^k r[g, k] / sum_{k<s} 2^k", t["V1"]),
           table("V2[g, s] = mean over the G traces of R[., s]", t["V2"]),
           table("baseline[g, s] = (s * V1 + (S - s) * V2) / S   (BRPO)", t["baseline"]),
           table("BRPO thinking advantage A[g, s] = R[g, s] - baseline[g, s]", t["brpo"]),
           table("GRPO on the same scores: base prior (all on b=16), baseline V2: one value per trace", t["grpo"]),
           table("decoupled summary advantage [g, s, a] = score - mean of its prompt's summaries", t["summary_adv"]),
           "trace 3 as one packed row (its 10 thinking tokens, then S x A summary blocks):",
           f"{'i':>3} {'token':<12}{'pos':>4}  {'trained as':<20}{'advantage':>9}"]
    S = len(BUDGETS)
    for i, (tok, a) in enumerate(zip(tokens, adv.tolist())):
        k = row["adv_index"][i]
        what = "-" if k < 0 else f"thinking, segment {k}" if k < S else f"summary s={(k - S) // A} a={(k - S) % A}"
        out.append(f"{i:>3} {tok:<12}{row['position_ids'][i]:>4}  {what:<20}" + (f"{a:9.3f}" if k >= 0 else ""))
    out.append("attention mask (row: query token i, column: key token j; x = i attends to j):")
    out += [f"{i:>3} " + "".join("x" if m else "." for m in line) for i, line in enumerate(mask.tolist())]
    return "\n\n".join(out[:10]) + "\n\n" + "\n".join(out[10:])


def figure(t: dict, path: str) -> str:
    """Trace 3 as a strip of thinking tokens cut at the budgets, a branch of A summaries at each cut,
    every token coloured by its advantage. A PNG with matplotlib, else a text chart (.txt)."""
    tokens, row, _, adv = packed_row(t)
    P, L, S = 2, THINK_LEN[3], len(BUDGETS)
    cuts = ar.summary_prompts(L, WHY[3], BUDGETS)[0]
    branches = [[i for i, k in enumerate(row["adv_index"]) if k == S + s * A + a] for s in range(S) for a in range(A)]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines = ["trace 3: thinking tokens and their advantage, then each budget's summaries (text chart)"]
        lines += [f"  {tokens[P + j]:<9}{adv[P + j]:+.3f}" + ("   | cut, budget " + str(BUDGETS[cuts.index(j + 1)])
                                                           if j + 1 in cuts else "") for j in range(L)]
        lines += [f"  b={BUDGETS[s]:<3} cut {cuts[s]:>2}, summary {a}: {adv[branches[s * A + a][0]] + 0:+.3f}"
                  for s in range(S) for a in range(A)]
        path = os.path.splitext(path)[0] + ".txt"
        open(path, "w").write("\n".join(lines) + "\n")
        return path
    # x is the token's position in the thinking: a summary's tokens continue from its cut, as their
    # position ids do. Each budget's A summaries hang under its cut, the last budget nearest the
    # thinking, so that no line crosses a box.
    fig, ax = plt.subplots(figsize=(12, 7))
    f = lambda x: np.sign(x) * np.sqrt(np.abs(x))  # noqa: E731  square root: small advantages still show
    norm, cmap = matplotlib.colors.FuncNorm((f, lambda y: np.sign(y) * y ** 2), -1, 1), plt.get_cmap("RdBu")
    names = {"...</think>": "...\n</think>", "\\boxed{5}": "\\boxed\n{5}", "\\boxed{7}": "\\boxed\n{7}"}

    def cell(x, y, i, trained=True):  # token i of the row at position x, coloured by its advantage
        ax.add_patch(plt.Rectangle((x - 0.45, y - 0.42), 0.9, 0.84, lw=0.8, ec="0.35",
                                   fc=cmap(norm(adv[i])) if trained else "0.9", hatch=None if trained else "///"))
        ax.text(x, y, names.get(tokens[i], tokens[i]), ha="center", va="center", fontsize=8.5, linespacing=0.95,
                bbox=None if trained else dict(fc="0.9", ec="none", pad=0.5))
    for j in range(L):  # the thinking, one box per token
        cell(j + 1, 0, P + j)
    ax.add_patch(plt.Rectangle((L + 0.55, -0.42), BUDGETS[-1] - L - 0.1, 0.84, fill=False, ls=":", ec="0.5"))
    ax.text((L + 1 + BUDGETS[-1]) / 2, 0, "budget not used: the trace closed", ha="center", va="center", fontsize=10,
            color="0.4")
    y = -1.4
    for s in reversed(range(S)):
        lo, hi = (BUDGETS[s - 1] if s else 0), min(BUDGETS[s], L)
        ax.plot([BUDGETS[s] + 0.5] * 2, [0.48, 1.5], color="k", ls=":", lw=1.4)  # the budget, over the thinking
        ax.text(BUDGETS[s] + 0.5, 1.58, f"b={BUDGETS[s]}", ha="center", va="bottom", fontsize=12)
        if lo < L:  # a segment with tokens: its advantage
            ax.text((lo + hi + 1) / 2, 0.68, f"A = {t['brpo'][3, s]:+.3f}", ha="center", fontsize=11)
        rows = [y - a for a in range(A)]
        ax.plot([cuts[s] + 0.5] * 2, [-0.42, rows[-1]], color="0.2", lw=1.4)  # hangs under its cut
        ax.text(BUDGETS[0] + 0.1, (rows[0] + rows[-1]) / 2, f"summaries at b={BUDGETS[s]}\n(they see {cuts[s]} tokens)",
                ha="right", va="center", fontsize=11)
        for a, row_y in zip(range(A), rows):
            block = range(row["block_start"][branches[s * A + a][0]], branches[s * A + a][-1] + 1)  # insert, summary
            for k, i in enumerate(block):
                cell(cuts[s] + 1 + k, row_y, i, trained=i in branches[s * A + a])
            ax.text(cuts[s] + len(block) + 0.65, row_y, f"{adv[block[-1]] + 0:+.2f}", va="center", fontsize=11)
        y -= A + 0.6
    ax.set_xticks(range(1, BUDGETS[-1] + 1))
    ax.tick_params(labelsize=11, left=False, labelleft=False)
    ax.set_xlabel("token position in the thinking (a summary's tokens continue from its cut)", fontsize=11)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlim(0.3, BUDGETS[-1] + 1.6), ax.set_ylim(y + 0.4, 2.2)
    ax.set_title(f"Worked example, trace 3: it closes its thinking with </think> after {L} tokens", fontsize=13)
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm, cmap), ax=ax, fraction=0.025, pad=0.01)
    bar.set_ticks([-1, -0.5, -0.2, -0.05, 0, 0.05, 0.2, 0.5, 1], labels=["-1", "-0.5", "-0.2", "-0.05", "0", "0.05",
                                                                        "0.2", "0.5", "1"], fontsize=10)
    bar.set_label("advantage (square-root scale)", fontsize=11)
    fig.text(0.015, 0.015, "Colour: the advantage each token is trained with (blue > 0, red < 0). Top: the "
             "thinking, with the BRPO advantage A of each segment;\ndotted: the budgets. Below: each budget's "
             "A = 2 summaries, hanging under the cut they see, with their decoupled advantage;\nhatched grey: "
             "the inserted text, not trained. Budgets 12 and 16 both see all 10 tokens: one prompt, four sibling "
             "summaries.", fontsize=10.5, va="bottom")
    fig.subplots_adjust(left=0.01, right=0.93, top=0.94, bottom=0.19)
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--figure", metavar="PATH", help="also draw trace 3 into PATH (PNG, or .txt without matplotlib)")
    args, t = p.parse_args(), worked_example()
    print(render(t))
    if args.figure:
        print(f"wrote {figure(t, args.figure)}")
