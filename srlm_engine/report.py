"""RUN/report.md and RUN/plots/*.png from the artifacts of a run folder (loop.py writes them).

It reads only what is on disk, so a report can be rebuilt from any finished or partial run:
the judge against the human EFT-eval scores for M0 (before EFT), M1, M2, ...; the judge's score
distribution and parse rate; pairs and ties; response length by iteration; the head-to-head
win rate of M_{t+1} over M_t; time per stage and the generation share of each iteration; the
training curves (loss per step of the SFT run and of each DPO iteration, DPO reward margins and
accuracies per step) from each training run's metrics.jsonl (train/metrics.py).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from srlm_engine.evaluate import JudgeMetrics, format_table
from srlm_engine.io import DataError, atomic_path, read_json, write_text
from srlm_engine.train.metrics import read_metrics

GENERATION_STAGES = ("prompts", "candidates", "judgments", "selection")


def _models(root: Path) -> list[str]:
    """m0, m1, ... from eval/judge_m<t>.json; other files there (a copy, a backup) are not ours."""
    found = (re.fullmatch(r"judge_(m(\d+))\.json", p.name) for p in (root / "eval").glob("judge_m*.json"))
    return [m[1] for m in sorted((m for m in found if m), key=lambda m: int(m[2]))]


def _iterations(root: Path) -> list[int]:
    found = (re.fullmatch(r"iter_(\d+)", p.name) for p in root.glob("iter_*") if (p / "metrics.json").is_file())
    return sorted(int(m[1]) for m in found if m)


def _training(root: Path) -> dict[str, list[dict]]:
    """{"M1 (SFT)": rows, "iteration 1 (DPO)": rows, ...}: the per-step metrics of every training
    run in the folder, finished or not (RUN/m1/train, RUN/iter_{t}/train)."""
    runs = {}
    if (root / "m1" / "train" / "metrics.jsonl").is_file():
        runs["M1 (SFT)"] = read_metrics(root / "m1" / "train" / "metrics.jsonl")
    found = (re.fullmatch(r"iter_(\d+)", p.parent.parent.name) for p in root.glob("iter_*/train/metrics.jsonl"))
    for t in sorted(int(m[1]) for m in found if m):
        runs[f"iteration {t} (DPO)"] = read_metrics(root / f"iter_{t}" / "train" / "metrics.jsonl")
    return {k: v for k, v in runs.items() if v}


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; a step without it, or with null (a non-finite value), is a gap."""
    return [r["step"] for r in rows], [math.nan if r.get(key) is None else r[key] for r in rows]


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else math.nan


def training_table(runs: dict[str, list[dict]], k: int = 10) -> list[str]:
    """One line per training run: steps, and the loss, DPO reward margin and reward accuracy as
    means over its first and last `k` steps (a single step is noisy)."""
    def span(rows, key, fmt):
        a, b = _mean(rows[:k], key), _mean(rows[-k:], key)
        return "" if math.isnan(a) and math.isnan(b) else f"{fmt(a)} -> {fmt(b)}"

    def pct(x):
        return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"

    def num(x):
        return "n/a" if math.isnan(x) else f"{x:.3f}"

    lines = ["| run | steps | loss | reward margin | reward accuracy |", "|---|---|---|---|---|"]
    for name, rows in runs.items():
        lines.append(f"| {name} | {rows[-1]['step']} | {span(rows, 'loss', num)} | "
                     f"{span(rows, 'rewards/margins', num)} | {span(rows, 'rewards/accuracies', pct)} |")
    return lines


def _training_plot(plt, runs: dict[str, list[dict]], path: Path) -> None:
    """Loss per step of the SFT run and of each DPO iteration, DPO reward margins and accuracies per step."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    panels = [(axes[0][0], "SFT loss", "loss", False), (axes[0][1], "DPO loss", "loss", True),
              (axes[1][0], "DPO reward margin (rewards/margins)", "rewards/margins", True),
              (axes[1][1], "DPO reward accuracy (rewards/accuracies)", "rewards/accuracies", True)]
    for ax, title, key, dpo in panels:
        shown = {n: r for n, r in runs.items() if n.endswith("(DPO)") == dpo}
        for name, rows in shown.items():
            ax.plot(*_series(rows, key), lw=1, label=name)
        if not shown:
            ax.text(0.5, 0.5, "no DPO iteration trained yet" if dpo else "no SFT metrics", ha="center",
                    va="center", transform=ax.transAxes, color="grey")
        elif dpo:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    axes[1][1].set_ylim(-0.05, 1.05)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _plots(root: Path, evals: dict, iters: dict, runs: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out = root / "plots"
    out.mkdir(exist_ok=True)
    made = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, mode in zip(axes, ("sample", "expected")):
        names = [n for n in evals if mode in evals[n]]
        for key, label in (("pairwise_accuracy", "pairwise acc."), ("spearman", "Spearman"),
                           ("kendall_tau", "Kendall tau")):
            ys = [evals[n][mode]["metrics"][key] for n in names]
            ax.plot([n.upper() for n in names], [y if y is not None else math.nan for y in ys], "o-", label=label)
        ax.set_title(f"judge vs human ({mode} mode)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance (pairwise)")
        rule = next((evals[n]["length_rule"]["pairwise_accuracy"] for n in names if "length_rule" in evals[n]), None)
        if rule is not None:
            ax.axhline(rule, color="tab:red", lw=0.8, ls="--", label="longer is better (pairwise)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "judge_vs_human.png")
    made.append("judge_vs_human.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.4))
    keys = ["unscored", "0", "1", "2", "3", "4", "5"]
    width = 0.8 / max(len(evals), 1)
    mode = "sample" if all("sample" in e for e in evals.values()) else "expected"  # a run may judge in one mode
    for i, (n, e) in enumerate(evals.items()):
        if mode not in e:
            continue
        d = e[mode]["distribution"]
        ax.bar([k + i * width for k in range(len(keys))], [d[k] for k in keys], width, label=n.upper())
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))], keys)
    ax.set_title(f"judge score distribution on EFT-eval ({mode} mode)")
    if ax.get_legend_handles_labels()[0]:  # no bars where no model was judged in that mode
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "score_distribution.png")
    made.append("score_distribution.png")
    plt.close(fig)

    if iters:
        ts = sorted(iters)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        axes[0].plot(ts, [iters[t]["candidate_mean_words"] for t in ts], "o-", label="candidates of M_t")
        axes[0].plot(ts, [iters[t]["head_to_head"]["mean_len_new"] for t in ts], "s-", label="M_{t+1} on held-out")
        axes[0].set_title("response length (words)")
        axes[0].set_xlabel("iteration t")
        axes[0].set_xticks(ts)
        axes[0].legend(fontsize=8)
        rates = [iters[t]["head_to_head"]["win_rate"] for t in ts]  # None: every prompt unscored
        axes[1].bar([str(t) for t in ts], [r if r is not None else math.nan for r in rates])
        axes[1].axhline(0.5, color="grey", lw=0.8)
        axes[1].set_ylim(0, 1)
        axes[1].set_title("win rate of M_{t+1} over M_t")
        axes[1].set_xlabel("iteration t")
        fig.tight_layout()
        _save(fig, out / "iterations.png")
        made.append("iterations.png")
        plt.close(fig)
    if runs:
        _training_plot(plt, runs, out / "training.png")
        made.append("training.png")
    return made


def _save(fig, path: Path) -> None:
    """A PNG written whole or not at all, like every file the engine writes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def _win_rate(h: dict) -> str:
    """The win rate and its W/T/L, e.g. 55% (5/1/4); prompts the judge left unscored follow."""
    rate = "n/a" if h["win_rate"] is None else f"{100 * h['win_rate']:.0f}%"
    unscored = f", {h['unscored']} unscored" if h.get("unscored") else ""
    return f"{rate} ({h['wins']}/{h['ties']}/{h['losses']}{unscored})"


def _metrics(d: dict) -> JudgeMetrics:
    return JudgeMetrics(**{k: math.nan if v is None else v for k, v in d.items()})  # null: not measurable


SETS = {"": "EFT-eval", "lengthfree": "the length-free set"}  # eval/judge_m*.json: key -> what it is


def _set(e: dict, key: str) -> dict | None:
    """One eval set's results in a judge_m*.json: the EFT-eval set at its top level, others under their key."""
    return e if key == "" else e.get(key)


def summary_table(root: Path) -> str:
    """The paper's reward-modelling table (sample mode and expected mode) for every model judged,
    on each eval set, beside the "longer is better" rule on the same items, and whether each
    judge beats that rule."""
    evals = {n: read_json(root / "eval" / f"judge_{n}.json") for n in _models(root)}
    parts = []
    for key, name in SETS.items():
        sets = {n: _set(e, key) for n, e in evals.items() if _set(e, key)}
        rule = next((x["length_rule"] for x in sets.values() if "length_rule" in x), None)
        for mode in ("sample", "expected"):
            rows = {("M0 (no EFT)" if n == "m0" else n.upper()): _metrics(x[mode]["metrics"])
                    for n, x in sets.items() if mode in x}
            if not rows:
                continue
            if rule is not None:
                rows["longer is better"] = _metrics(rule)
            parse = " / ".join(f"{n.upper()} {100 * x[mode]['parse_rate']:.0f}%" for n, x in sets.items() if mode in x)
            parts.append(f"Judge vs human scores on {name}, {mode} mode (parse rate: {parse}):\n\n"
                         + format_table(rows) + _against_length(sets, mode, rule))
    return "\n".join(parts)


def _against_length(sets: dict, mode: str, rule: dict | None) -> str:
    """Each judge's pairwise accuracy against the length rule's, in words."""
    if rule is None:
        return ""
    base = _metrics(rule).pairwise_accuracy
    if math.isnan(base):
        return "\nThe length rule has nothing to measure on these items.\n"
    said = []
    for n, x in sets.items():
        if mode not in x:
            continue
        acc = _metrics(x[mode]["metrics"]).pairwise_accuracy
        if math.isnan(acc):
            said.append(f"{n.upper()} cannot be compared (it scored nothing)")
        elif acc > base:
            said.append(f"{n.upper()} beats it ({100 * acc:.1f}%)")
        else:
            said.append(f"{n.upper()} does not beat it ({100 * acc:.1f}%): it is no better than counting characters")
    return f"\nThe rule \"the longer answer is better\" orders {100 * base:.1f}% of the pairs right. " + \
        "; ".join(said) + ".\n"


def rebuild_report(root: str | Path) -> Path:
    """report.md and plots/ again from the files of a run folder, finished or not (`srlm report
    RUN`), with the settings its manifest.json pins; no model is loaded."""
    from srlm_engine.config import ConfigError, LoopConfig
    root = Path(root)
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"{root}: not a run folder (no manifest.json)")
    pinned = read_json(manifest)
    if not isinstance(pinned, dict) or not isinstance(pinned.get("config"), dict):
        raise DataError(f"{manifest}: no config object")
    try:
        cfg = LoopConfig.build(None, pinned["config"])
    except ConfigError as e:
        raise DataError(f"{manifest}: {e}") from None
    return write_report(root, cfg)


def write_report(root: Path, cfg) -> Path:
    root = Path(root)
    evals = {n: read_json(root / "eval" / f"judge_{n}.json") for n in _models(root)}
    iters = {t: read_json(root / f"iter_{t}" / "metrics.json") for t in _iterations(root)}
    runs = _training(root)
    plots = _plots(root, evals, iters, runs)
    lines = [f"# Self-rewarding run: {root}", "",
             f"Model: {read_json(root / 'manifest.json')['model']}; {cfg.iterations} iteration(s), "
             f"{cfg.prompts} prompts x N={cfg.n}, K={cfg.judge_samples}, judge mode in the loop: {cfg.judge_mode}.",
             "", "## The judge against human scores", "",
             f"M0 is the starting model before EFT fine-tuning; M1 after SFT on {cfg.m1_data}; M_{{t+1}} after "
             "DPO iteration t. 5-best % counts instructions whose human-best response gets a judge "
             "score of at least 4.5 (the mean of K samples, or the expected score).", "",
             summary_table(root), ""]
    if iters:
        lines += ["## Iterations", "",
                  "| t | prompts | pairs | ties | unscored-only | candidate words | M_{t+1} words | "
                  "win rate M_{t+1} vs M_t (W/T/L) | generation share of time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t, m in iters.items():
            c, h = m["pair_counts"], m["head_to_head"]
            tm = read_json(root / f"iter_{t}" / "timings.json") if (root / f"iter_{t}" / "timings.json").is_file() else {}
            total = sum(tm.values())
            gen = sum(v for k, v in tm.items() if any(s in k for s in GENERATION_STAGES))
            share = f"{100 * gen / total:.0f}% of {total:.0f}s" if total else "n/a"
            lines.append(f"| {t} | {m['prompts']} | {c.get('pairs', 0)} | {c.get('ties', 0)} | "
                         f"{c.get('too_few_scored', 0)} | {m['candidate_mean_words']:.0f} | {h['mean_len_new']:.0f} | "
                         f"{_win_rate(h)} | {share} |")
        chosen = {t: read_json(root / f"iter_{t}" / "selection.json") for t in iters
                  if (root / f"iter_{t}" / "selection.json").is_file()}
        if chosen:
            lines += ["", "Checkpoint selection (each DPO checkpoint against the best so far on the validation "
                      "prompts, by the fixed judge): " + "; ".join(
                          f"iteration {t}: step {c['chosen_step']} of "
                          f"{', '.join(str(x['step']) for x in c['candidates'])}" for t, c in chosen.items())]
        lines += ["", "Time per stage (seconds):", ""]
        for t in iters:
            tm = read_json(root / f"iter_{t}" / "timings.json")
            lines.append(f"- iteration {t}: " + ", ".join(f"{k.split(': ', 1)[-1]} {v:.0f}" for k, v in tm.items()))
    if runs:
        lines += ["", "## Training", "",
                  "Per-step metrics of each training run (its train/metrics.jsonl, under TRL's names), as means "
                  "over the first and the last 10 steps; plots/training.png has every step.", "",
                  *training_table(runs)]
    lines += ["", "## What a small model can and cannot do as its own judge", "", _honest(evals), ""]
    lines += [f"![{p}](plots/{p})" for p in plots]
    path = root / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _honest(evals: dict) -> str:
    """A plain reading of the numbers, computed from them: is the judge better than chance?"""
    out = []
    for n, e in evals.items():
        for mode in ("sample", "expected"):
            if mode not in e:
                continue
            acc, parse = e[mode]["metrics"]["pairwise_accuracy"], e[mode]["parse_rate"]
            measurable = acc is not None and not math.isnan(acc)
            if parse == 0:
                verdict = "never wrote a score line, so it cannot judge in this mode"
            elif not measurable:
                verdict = ("not measurable, since no two responses to one instruction have different "
                           "human scores")
            elif acc < 0.45:
                verdict = "worse than chance: it tends to prefer the answers humans rank lower"
            elif acc < 0.55:
                verdict = "no better than a coin flip"
            elif acc < 0.65:
                verdict = "weakly above chance"
            else:
                verdict = "clearly above chance"
            shown = f"{100 * acc:.1f}%" if measurable else "n/a"
            out.append(f"- {n.upper()}, {mode} mode: pairwise accuracy {shown}, parse rate "
                       f"{100 * parse:.0f}%: {verdict}.")
    out.append("A pairwise accuracy near 50% means the judge orders answers at random, and self-rewarding "
               "then trains on noise. The paper's 70B model reached 78-82%; the figures above are what "
               "this model reaches, measured, not assumed.")
    return "\n".join(out)
