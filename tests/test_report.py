"""The report's plain reading of the numbers: what it says where a number cannot be measured."""
import math

import pytest

from srlm_engine.report import _honest, _iterations, _models, _win_rate


def judge_file(acc, parse=1.0):
    return {"sample": {"metrics": {"pairwise_accuracy": acc}, "parse_rate": parse}}


@pytest.mark.parametrize("acc", [math.nan, None])  # NaN as computed; None if a JSON writer nulls it
def test_no_pairs_with_differing_human_scores_is_not_measurable(acc):
    # judge_vs_human gives NaN pairwise accuracy when no two responses differ in human score
    line = _honest({"m1": judge_file(acc)}).splitlines()[0]
    assert line.startswith("- M1, sample mode: pairwise accuracy n/a, parse rate 100%: not measurable")
    assert "chance" not in line


@pytest.mark.parametrize("acc, verdict", [(0.4, "worse than chance"), (0.5, "coin flip"),
                                          (0.6, "weakly above chance"), (0.8, "clearly above chance")])
def test_measured_accuracy_verdicts(acc, verdict):
    line = _honest({"m1": judge_file(acc)}).splitlines()[0]
    assert f"pairwise accuracy {100 * acc:.1f}%" in line and verdict in line


def test_win_rate_with_unscored_prompts():
    assert _win_rate({"wins": 5, "ties": 1, "losses": 4, "win_rate": 0.55}) == "55% (5/1/4)"  # older files
    assert _win_rate({"wins": 1, "ties": 0, "losses": 1, "unscored": 2, "win_rate": 0.5}) == "50% (1/0/1, 2 unscored)"
    assert _win_rate({"wins": 0, "ties": 0, "losses": 0, "unscored": 3, "win_rate": None}) == "n/a (0/0/0, 3 unscored)"


def test_a_plot_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from srlm_engine.report import _save

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    _save(fig, tmp_path / "p.png")
    good = (tmp_path / "p.png").read_bytes()
    assert good.startswith(b"\x89PNG")
    real = Figure.savefig

    def killed(self, fname, **kw):  # the file half written, then the process dies
        real(self, fname, **kw)
        with open(fname, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["p.png"]
    plt.close(fig)


def test_stray_files_in_the_run_folder_are_not_read(tmp_path):
    # a copy or backup beside the run's files is no iteration's file: parsed as one, it would end
    # the finished loop with "invalid literal for int()"
    (tmp_path / "eval").mkdir()
    for name in ("judge_m10.json", "judge_m2.json", "judge_m1 copy.json", "judge_m1.json.bak", "judge_mx.json"):
        (tmp_path / "eval" / name).write_text("{}")
    for name in ("iter_2", "iter_10", "iter_1 backup", "iter_x", "iter_3"):
        (tmp_path / name).mkdir()
        if name != "iter_3":  # an iteration not finished: no metrics yet
            (tmp_path / name / "metrics.json").write_text("{}")
    assert _models(tmp_path) == ["m2", "m10"]
    assert _iterations(tmp_path) == [2, 10]


def test_summary_table_reads_unmeasurable_metrics_written_as_null(tmp_path):
    from dataclasses import asdict

    from srlm_engine.evaluate import judge_vs_human
    from srlm_engine.io import write_json
    from srlm_engine.report import summary_table

    m = judge_vs_human([[3.0, 3.0]], [[4.0, 2.0]])  # one instruction, equal human scores: no pairs
    assert math.isnan(m.pairwise_accuracy) and math.isnan(m.spearman)
    write_json(tmp_path / "eval" / "judge_m1.json", {"sample": {"metrics": asdict(m), "parse_rate": 1.0}})
    table = summary_table(tmp_path)
    row = next(x for x in table.splitlines() if x.startswith("| pairwise"))
    assert row.endswith("| n/a |")


def test_every_judge_table_has_the_length_rule_beside_it_and_says_who_beats_it(tmp_path):
    from dataclasses import asdict

    from srlm_engine.evaluate import judge_vs_human, length_rule
    from srlm_engine.io import write_json
    from srlm_engine.report import summary_table

    items = [{"instruction": "q", "responses": ["a" * 9, "a" * 5, "a" * 1], "scores": [5, 3, 0]},
             {"instruction": "r", "responses": ["b" * 2, "b" * 7, "b" * 4], "scores": [4, 1, 2]}]
    rule = asdict(length_rule(items))  # q: 3 of 3 pairs, r: 0 of 3 -> 50%
    good = asdict(judge_vs_human([it["scores"] for it in items], [[5, 3, 0], [4, 1, 2]]))  # 100%
    mute = asdict(judge_vs_human([it["scores"] for it in items], [[None] * 3, [None] * 3]))  # scored nothing
    for name, m in (("m0", mute), ("m1", good)):
        result = {mode: {"metrics": m, "parse_rate": 0.0 if m is mute else 1.0} for mode in ("sample", "expected")}
        write_json(tmp_path / "eval" / f"judge_{name}.json",
                   {**result, "length_rule": rule, "lengthfree": {**result, "length_rule": rule}})
    table = summary_table(tmp_path)
    assert table.count("| | M0 (no EFT) | M1 | longer is better |") == 4  # 2 sets x 2 modes
    assert "Judge vs human scores on the length-free set, expected mode" in table
    assert "| pairwise accuracy | n/a | 100.0 | 50.0 |" in table  # nothing parsed: n/a, not 0.0
    assert "| 5-best % | n/a | 50.0 | n/a |" in table  # the length rule has no score scale
    assert table.count('The rule "the longer answer is better" orders 50.0% of the pairs right. '
                       'M0 cannot be compared (it scored nothing); M1 beats it (100.0%).') == 4


def test_training_curves_and_table_from_each_runs_metrics(tmp_path):
    """The SFT run's and each DPO iteration's metrics.jsonl become plots/training.png and one
    table line each; a file with the names srlm-engine used before TRL's is read the same."""
    import json
    from dataclasses import replace

    from srlm_engine.config import LoopConfig
    from srlm_engine.io import write_json
    from srlm_engine.report import write_report

    def log(path, rows):
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    log(tmp_path / "m1" / "train" / "metrics.jsonl",
        [{"step": s, "loss": 2.0 - 0.05 * s, "learning_rate": 1e-5, "grad_norm": 1.0} for s in range(1, 21)])
    log(tmp_path / "iter_1" / "train" / "metrics.jsonl",  # TRL's names
        [{"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.025 * s}
         for s in range(1, 21)])
    log(tmp_path / "iter_2" / "train" / "metrics.jsonl",  # the names of older srlm-engine runs
        [{"step": 1, "loss": 0.69, "lr": 1e-6, "margin": 0.0, "reward_accuracy": 0.0},
         {"step": 2, "loss": None, "lr": 1e-6, "margin": 0.5, "reward_accuracy": 1.0, "skipped": True}])
    write_json(tmp_path / "manifest.json", {"model": "m0"})
    cfg = LoopConfig(iterations=2, prompts=4, n=2, judge_samples=1, judge_mode="sample")
    report = write_report(tmp_path, cfg).read_text()
    assert (tmp_path / "plots" / "training.png").read_bytes().startswith(b"\x89PNG")
    assert "![training.png](plots/training.png)" in report
    # means of the first and last 10 steps: SFT loss 2 - 0.05 * 5.5 -> 2 - 0.05 * 15.5
    assert "| M1 (SFT) | 20 | 1.725 -> 1.225 |  |  |" in report
    assert "| iteration 1 (DPO) | 20 | 0.645 -> 0.545 | 0.110 -> 0.310 | 64% -> 89% |" in report
    assert "| iteration 2 (DPO) | 2 | 0.690 -> 0.690 | 0.250 -> 0.250 | 50% -> 50% |" in report  # null loss left out
    assert "M1 after SFT on IFT + EFT;" in report  # and on EFT alone where no IFT record trains
    assert "M1 after SFT on EFT alone;" in write_report(tmp_path, replace(cfg, eft_share=1.0)).read_text()
