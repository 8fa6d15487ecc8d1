"""The training log: one JSON line per optimizer step in OUT/metrics.jsonl and, with report_to
"tensorboard", the same scalars as TensorBoard events in OUT/tb/.

Metrics carry the names TRL logs them under, so curves and dashboards made for TRL runs read ours:
    loss, grad_norm, learning_rate, epoch    every step (transformers' Trainer)
    rewards/chosen, rewards/rejected         DPO: mean beta * (log pi - log ref) of the replies
    rewards/accuracies, rewards/margins      DPO: share of pairs with chosen reward > rejected, mean gap
    logps/chosen, logps/rejected             DPO: mean summed log-prob of the replies (per-token mean for ipo)
    logits/chosen, logits/rejected           DPO: mean logit over the vocabulary and the replies' tokens
Beside them: step, tokens, tokens_per_s, seconds, skipped (a non-finite step left without update).
TensorBoard tags are train/<name>, as transformers' TensorBoard callback writes them.

Only rank 0 writes. metrics.jsonl is appended a line per step, not written atomically: a resumed
run first cuts it back to its checkpoint's step (the lines a killed run logged past it, a partial
last line), and the TensorBoard writer purges the events past that step. TensorBoard is imported
only when asked for, so a run without it never loads it.
"""
from __future__ import annotations

import json
from pathlib import Path

from srlm_engine.config import ConfigError
from srlm_engine.io import to_json, write_text

# key -> TRL's name, for metrics.jsonl files of srlm-engine releases that named them otherwise
RENAMED = {"lr": "learning_rate", "chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected",
           "reward_accuracy": "rewards/accuracies", "margin": "rewards/margins"}


def summary_writer():
    """torch's TensorBoard SummaryWriter class; a ConfigError saying what to install without it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(f"report_to 'tensorboard' needs the tensorboard package (pip install tensorboard): {e}") \
            from None
    return SummaryWriter


class MetricsLog:
    """OUT/metrics.jsonl (and OUT/tb/) of a run that starts, or resumes, after step `start`."""

    def __init__(self, out_dir: Path, start: int, report_to: str = "none"):
        self.path = Path(out_dir) / "metrics.jsonl"
        trim(self.path, start)
        self.tb = None
        if report_to == "tensorboard":
            self.tb = summary_writer()(log_dir=str(Path(out_dir) / "tb"), purge_step=start + 1 if start else None)

    def write(self, row: dict) -> None:
        """Append one step's row ({"step": n, ...})."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(to_json(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def trim(path: Path, upto: int) -> None:
    """Drop lines past step `upto` (steps a killed run logged after its last checkpoint) and any
    partial last line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text(path, "".join(x + "\n" for x in keep))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, under TRL's names whatever names the file uses; a line that is
    not a JSON object (a run killed mid-write) is left out."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append({RENAMED.get(k, k): v for k, v in row.items()})
    return rows
