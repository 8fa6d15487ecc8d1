"""The `srlm` command line: model info and clear errors."""
from srlm_engine.cli import main


def test_model_info_prints_config_and_parameter_count(tmp_path, capsys, tiny_writer):
    model = tiny_writer(tmp_path, "gqa_untied")
    assert main(["model", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in model.parameters())
    assert f"{n:,}" in out and "num_key_value_heads" in out


def test_bad_model_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["model", "info", str(tmp_path / "missing")]) == 2
    assert "model directory not found" in capsys.readouterr().err
