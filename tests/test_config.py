"""Loop and training settings: every field's type is checked, and the ranges the trainer and the
DPO loss would otherwise reject only at their first step."""
import math
import re
from dataclasses import replace

import pytest

from srlm_engine.config import ConfigError, LoopConfig, TrainConfig


def test_presets_and_defaults_are_valid():
    for preset in (None, *LoopConfig.PRESETS):
        cfg = LoopConfig.build(preset)
        assert isinstance(cfg.sft, TrainConfig) and isinstance(cfg.dpo, TrainConfig)


def test_paper_batch_of_16_holds_for_any_number_of_processes():
    """The paper preset sets the global batch (16) and each process's accumulation follows from
    it, so `--preset paper --nproc 2` trains with batch 16 (a fixed grad_accum of 4 per process
    would make it 32)."""
    cfg = LoopConfig.build("paper")
    for t in (cfg.sft, cfg.dpo):
        assert [t.micro_batch_size * w * t.accum_steps(w) for w in (1, 2, 4)] == [16, 16, 16]
        with pytest.raises(ConfigError, match=r"global_batch_size 16 is not a multiple of processes x "
                                              r"micro_batch_size = 3 x 4"):
            t.accum_steps(3)
    # a later layer's grad_accum replaces the preset's global batch (and the other way round)
    cfg = LoopConfig.build("paper", {"sft": {"grad_accum": 2}}, dpo={"global_batch_size": 8})
    assert (cfg.sft.grad_accum, cfg.sft.global_batch_size, cfg.sft.accum_steps(2)) == (2, None, 2)
    cfg = LoopConfig.build(None, {"dpo": {"grad_accum": 2}}, dpo={"global_batch_size": 8})
    assert (cfg.dpo.grad_accum, cfg.dpo.global_batch_size, cfg.dpo.accum_steps(1)) == (None, 8, 2)
    assert TrainConfig().accum_steps(2) == 4  # neither set: grad_accum 4 per process
    with pytest.raises(ConfigError, match=r"set grad_accum \(2\) or global_batch_size \(8\), not both"):
        TrainConfig(grad_accum=2, global_batch_size=8)


def test_toml_numbers_and_lists_are_read():
    # TOML gives an int where a float is meant (`temperature = 1`) and a list for the betas
    cfg = LoopConfig.build(None, {"temperature": 1, "length_control": True,
                                  "dpo": {"adam_betas": [0.9, 0.95], "label_smoothing": 0.1, "epochs": 2}})
    assert cfg.temperature == 1 and cfg.length_control is True
    assert cfg.dpo.adam_betas == (0.9, 0.95) and cfg.dpo.epochs == 2


@pytest.mark.parametrize("setting, msg", [
    ({"length_control": "false"}, r"length_control must be true or false, got 'false'"),
    ({"length_control": 0}, r"length_control must be true or false, got 0"),
    ({"seed": "abc"}, r"seed must be an integer, got 'abc'"),
    ({"prompts": 2.5}, r"prompts must be an integer, got 2.5"),
    ({"n": True}, r"n must be an integer, got True"),
    ({"temperature": "0.7"}, r"temperature must be a number, got '0.7'"),
    ({"min_margin": -0.1}, r"min_margin must be in \[0, 5\) \(scores are 0 to 5\), got -0.1"),
    ({"top_p": None}, r"top_p must be a number, got None"),
    ({"judge_temperature": False}, r"judge_temperature must be a number, got False"),
    ({"judge_template": 3}, r"judge_template must be a string or unset, got 3"),
    ({"dtype": 16}, r"dtype must be a string, got 16"),
    ({"sft": "x"}, r"sft must be a table of training settings, got 'x'"),
    ({"dpo": {"progress": "no"}}, r"dpo: progress must be true or false, got 'no'"),
    ({"dpo": {"warmup_steps": 2.5}}, r"dpo: warmup_steps must be an integer, got 2.5"),
    ({"dpo": {"max_steps": 2.0}}, r"dpo: max_steps must be an integer or unset, got 2.0"),
    ({"dpo": {"lr": "1e-6"}}, r"dpo: lr must be a number or unset, got '1e-6'"),
    ({"dpo": {"beta": "0.1"}}, r"dpo: beta must be a number, got '0.1'"),
    ({"dpo": {"adam_betas": [0.9]}}, r"dpo: adam_betas must be a pair of numbers"),
    ({"dpo": {"adam_betas": ["0.9", 0.99]}}, r"dpo: adam_betas must be a pair of numbers"),
])
def test_wrong_type_is_a_config_error_naming_the_field(setting, msg):
    with pytest.raises(ConfigError, match=msg):
        LoopConfig.build(None, setting)


@pytest.mark.parametrize("setting, msg", [
    (dict(weight_decay=-1.0), r"weight_decay must be >= 0, got -1\.0"),
    (dict(weight_decay=math.nan), r"weight_decay must be >= 0"),
    (dict(adam_betas=(1.5, 2.0)), r"adam_betas must each be in \[0, 1\), got \(1\.5, 2\.0\)"),
    (dict(adam_betas=(0.9, 1.0)), r"adam_betas must each be in \[0, 1\)"),
    (dict(adam_betas=(-0.1, 0.9)), r"adam_betas must each be in \[0, 1\)"),
    (dict(adam_eps=0.0), r"adam_eps must be > 0"),
    # srlm_kernels.dpo_loss's rule: [0, 0.5) for sigmoid and robust, 0 for hinge and ipo
    (dict(label_smoothing=0.5, loss_type="robust"), r"label_smoothing must be in \[0, 0\.5\) for loss_type 'robust'"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0\.5\) for loss_type 'sigmoid'"),
    (dict(label_smoothing=-0.1), r"label_smoothing must be in \[0, 0\.5\)"),
    (dict(label_smoothing=0.1, loss_type="hinge"), r"label_smoothing must be 0 for loss_type 'hinge'"),
    (dict(label_smoothing=0.1, loss_type="ipo"), r"label_smoothing must be 0 for loss_type 'ipo'"),
])
def test_training_ranges(setting, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**setting)
    with pytest.raises(ConfigError, match="dpo: " + msg):
        LoopConfig.build(None, {"dpo": setting})


def test_label_smoothing_follows_the_loss_rule():
    # The config accepts exactly the values the DPO loss takes, for every loss type.
    import torch
    from srlm_kernels import dpo_loss
    z = torch.zeros(2, dtype=torch.float64)
    for loss_type in ("sigmoid", "robust", "hinge", "ipo"):
        for ls in (-0.1, 0.0, 0.1, 0.49, 0.5, 0.7):
            try:
                dpo_loss(z, z, z, z, 0.1, loss_type, ls, backend="torch")
                loss_ok = True
            except ValueError:
                loss_ok = False
            try:
                TrainConfig(loss_type=loss_type, label_smoothing=ls)
                config_ok = True
            except ConfigError:
                config_ok = False
            assert config_ok == loss_ok, (loss_type, ls)


# ---------------------------------------------------------------------- field metadata, TOML files

SETTINGS = (TrainConfig, LoopConfig)


@pytest.mark.parametrize("cls", SETTINGS)
def test_every_setting_says_what_it_is_and_its_choices_are_exactly_what_it_takes(cls):
    from dataclasses import fields
    for f in fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        for value in f.metadata["choices"] or ():
            assert getattr(cls(**{f.name: value}), f.name) == value
        if f.metadata["choices"]:
            quoted = " or ".join([", ".join(repr(c) for c in f.metadata["choices"][:-1]),
                                  repr(f.metadata["choices"][-1])])
            with pytest.raises(ConfigError, match=re.escape(f"{f.name} must be {quoted}, got 'nope'")):
                cls(**{f.name: "nope"})


def test_the_dpo_only_settings_are_those_the_sft_trainer_never_reads():
    from dataclasses import fields
    assert {f.name for f in fields(TrainConfig) if f.metadata["only"] == "dpo"} == {
        "beta", "loss_type", "label_smoothing", "ref_batch_size"}
    assert {f.metadata["only"] for f in fields(TrainConfig)} == {None, "dpo"}


def test_the_generation_dtypes_are_the_devices():
    from srlm_engine.config import GENERATION_DTYPES
    from srlm_engine.device import DTYPES
    assert GENERATION_DTYPES == DTYPES


def test_presets_are_the_shipped_config_files():
    import tomllib

    from srlm_engine.config import read_toml, shipped_config
    for name in LoopConfig.PRESETS:
        f = shipped_config(name)
        assert f.is_file()  # inside the package: importlib.resources finds it wherever it is installed
        text = f.read_text(encoding="utf-8")
        assert read_toml(name) == tomllib.loads(text)
        assert LoopConfig.build(name) == LoopConfig.build(None, tomllib.loads(text))
    quick, small, paper = (LoopConfig.build(p) for p in ("quick", "small", "paper"))
    # what the presets are for (README): the demo's short CPU run, whose judge learns the digit the expected
    # mode reads; the same loop with M1 on EFT alone, the seed and the examples where length says nothing;
    # the paper's batch of 16 and checkpoint selection
    assert (quick.iterations, quick.judge_mode, quick.eft_target, quick.sft.max_seq_len) == (1, "expected", "score",
                                                                                             448)
    # quick fits 30 minutes on a 2-core CPU in float32: the rubric computed once per micro-batch, the top 8
    # blocks trained, the frozen ones run once per record, for SFT and DPO
    assert (quick.sft.share_prefix, quick.sft.trainable_layers, quick.sft.cache_frozen) == (True, 8, True)
    assert (quick.dpo.share_prefix, quick.dpo.trainable_layers, quick.dpo.cache_frozen) == (True, 8, True)
    assert small == replace(quick, eft_share=1.0, eft_extra="eft_near_topic.jsonl")
    assert (paper.prompts, paper.sft.global_batch_size, paper.dpo.lr, paper.select_checkpoints) == (5000, 16, 1e-6,
                                                                                                     True)


def test_a_file_of_a_presets_name_is_read_before_the_shipped_one(tmp_path, monkeypatch):
    from srlm_engine.config import read_toml
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").write_text("iterations = 7\n")
    assert read_toml("quick") == {"iterations": 7}


def test_config_file_errors_name_the_file(tmp_path):
    from srlm_engine.config import read_toml
    bad = tmp_path / "bad.toml"
    bad.write_text("iterations = \n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))}: invalid TOML: .*line 1"):
        read_toml(bad)
    with pytest.raises(ConfigError, match=r"missing\.toml: No such file or directory \(shipped configs: quick, small, "
                                          r"paper\)"):
        read_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"run\.toml: unknown loop setting 'iteratoins'"):
        LoopConfig.build("quick", {"iteratoins": 3}, "run.toml")
    with pytest.raises(ConfigError, match=r"flags: unknown loop setting 'iteratoins'"):
        LoopConfig.build(None, None, iteratoins=3)


def test_printed_settings_read_back_the_same():
    import tomllib

    from srlm_engine.config import to_toml
    odd = 'a "quoted" C:\\path\nwith ü and \t'
    cfgs = [LoopConfig.build(p) for p in (None, *LoopConfig.PRESETS)]
    cfgs.append(LoopConfig.build("quick", {"judge_template": odd, "min_margin": 0.25,
                                           "sft": {"max_grad_norm": None, "adam_betas": [0.8, 0.95]}}))
    for cfg in cfgs:
        text = to_toml(cfg)
        assert LoopConfig.build(None, tomllib.loads(text)) == cfg
    text = to_toml(cfgs[-1])  # TOML has no null
    assert "# prompt_pool is unset" in text and 'max_grad_norm = "none"' in text and "# max_steps" not in text
    t = TrainConfig(lr=3e-5, max_steps=None)
    assert TrainConfig.from_dict(tomllib.loads(to_toml(t))) == t
