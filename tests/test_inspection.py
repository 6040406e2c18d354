"""Tests of quaff_compile.explain and the quaff-inspect command."""

from __future__ import annotations

import json

import torch

import quaff_compile
from quaff_compile.inspection import main
from tests.conftest import TINY_OPTIONS, tiny_peft_llama

INPUTS = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


def test_explain_reports_every_linear():
    model = tiny_peft_llama()
    report = quaff_compile.explain(model, input_ids=INPUTS, options=TINY_OPTIONS)

    by_fqn = {linear.fqn: linear for linear in report.linears}
    down_proj = by_fqn["base_model.model.model.layers.1.mlp.down_proj.base_layer"]
    assert down_proj.decision == "int8"
    assert down_proj.weight_shape == (64, 128)
    assert by_fqn["base_model.model.model.layers.0.mlp.gate_proj.base_layer"].outlier_channels == 2
    assert by_fqn["base_model.model.lm_head"].decision == "float"
    assert "skip_fqns" in by_fqn["base_model.model.lm_head"].reason

    totals = report.totals()
    assert totals["int8"] == 14
    assert totals["float"] == 29
    assert totals["float: the weight is trainable (requires_grad=True)"] == 28


def test_explain_table_rows_start_with_fqn():
    report = quaff_compile.explain(tiny_peft_llama(), input_ids=INPUTS, options=TINY_OPTIONS)
    lines = str(report).splitlines()
    assert lines[0].startswith("fqn")
    fqns = [linear.fqn for linear in report.linears]
    for fqn, line in zip(fqns, lines[1:]):
        assert line.startswith(fqn + " ")
    assert "int8: 14" in lines


def test_explain_graph_before_and_after():
    report = quaff_compile.explain(tiny_peft_llama(), input_ids=INPUTS, options=TINY_OPTIONS)
    graph = report.graphs[0]
    assert graph.code_before.count("torch._C._nn.linear(") == 43
    assert graph.code_after.count("torch._C._nn.linear(") == 29
    assert graph.code_after.count("smoothed_quaff_linear(") == 14


def test_explain_moves_no_state():
    model = tiny_peft_llama()
    model.train()
    quaff_compile.explain(model, input_ids=INPUTS, options=TINY_OPTIONS)
    assert quaff_compile.layer_states(model) == {}

    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    compiled(input_ids=INPUTS, labels=INPUTS).loss.backward()
    states = quaff_compile.layer_states(model)
    before = {fqn: (state.updates, state.smooth_scale.clone()) for fqn, state in states.items()}

    report = quaff_compile.explain(model, input_ids=INPUTS, options=TINY_OPTIONS)
    assert report.totals()["int8"] == 14
    for fqn, state in quaff_compile.layer_states(model).items():
        assert state.updates == before[fqn][0]
        assert torch.equal(state.smooth_scale, before[fqn][1])


def test_explain_save_writes_files(tmp_path):
    report = quaff_compile.explain(tiny_peft_llama(), input_ids=INPUTS, options=TINY_OPTIONS)
    folder = report.save(tmp_path / "report")
    assert (folder / "linears.txt").read_text().startswith("fqn")
    assert json.loads((folder / "totals.json").read_text())["int8"] == 14
    assert "smoothed_quaff_linear" in (folder / "graph_0_after.py").read_text()
    assert "smoothed_quaff_linear" not in (folder / "graph_0_before.py").read_text()


def test_quaff_inspect_command(tiny_model_folder, tmp_path, capsys):
    arguments = ["--model", str(tiny_model_folder), "--seq-len", "12", "--lora-r", "4", "--save", str(tmp_path / "out")]
    assert main(arguments) == 0
    output = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj.base_layer" in output
    assert "int8: 14" in output
    assert (tmp_path / "out" / "linears.txt").exists()
