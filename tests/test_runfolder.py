"""RUN/manifest.json: what pins a run folder, and what a rerun with other settings is told."""
import json

import pytest

from srlm_engine.config import LoopConfig
from srlm_engine.runfolder import LoopStop, RunFolder


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def drop_keys(manifest, *keys):
    m = json.loads(manifest.read_text())
    for key in keys:
        table, _, name = key.rpartition(".")
        del (m["config"][table] if table else m["config"])[name]
    manifest.write_text(json.dumps(m))


def test_a_setting_added_since_the_folder_was_made_counts_as_its_default(tmp_path, model_dir):
    root = tmp_path / "run"
    RunFolder(root, LoopConfig(), model_dir, log=lambda *_: None)
    drop_keys(root / "manifest.json", "eft_target", "eft_augment", "sft.report_to")
    RunFolder(root, LoopConfig(), model_dir, log=lambda *_: None)  # the same run: resumes
    with pytest.raises(LoopStop, match=r"changed: eft_target: 'judgment' -> 'score'"):
        RunFolder(root, LoopConfig(eft_target="score"), model_dir, log=lambda *_: None)


def test_the_judge_template_pins_the_folder(tmp_path, model_dir):
    root = tmp_path / "run"
    RunFolder(root, LoopConfig(), model_dir, log=lambda *_: None)
    assert "judge_template" in json.loads((root / "manifest.json").read_text())["inputs"]
    template = tmp_path / "judge.txt"
    template.write_text("Rate {response} to {instruction}.\nScore: <points>")
    with pytest.raises(LoopStop, match=r"input judge_template"):
        RunFolder(root, LoopConfig(judge_template=str(template)), model_dir, log=lambda *_: None)
