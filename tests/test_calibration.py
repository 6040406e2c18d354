"""Tests of offline calibration, outlier-channel files and the saved Quaff state."""

from __future__ import annotations

import pytest
import torch

import quaff_compile
from quaff_compile.calibration import calibrate, load_outlier_channels, normalize_fqn, save_outlier_channels
from tests.conftest import TINY_OPTIONS, tiny_llama, tiny_peft_llama

INJECTED = [5, 40]
INPUTS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(64, 64)
        self.second = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.second(self.first(x))


def outlier_batches(count=3):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = torch.randn(16, 64, generator=generator)
        x[:, INJECTED] *= 1000.0
        batches.append((x,))
    return batches


@pytest.mark.parametrize(
    "strategy, threshold, max_ratio",
    # top_abs always takes its full share, so it gets room for exactly two.
    [("mean_times", 20.0, 4 / 64), ("top_abs", 0.0, 2 / 64), ("zscore", 10.0, 4 / 64), ("static", 50.0, 4 / 64)],
)
def test_strategy_finds_injected_channels(strategy, threshold, max_ratio):
    model = TwoLinears()
    channels = calibrate(model, outlier_batches(), strategy=strategy, threshold=threshold, max_ratio=max_ratio)
    assert sorted(channels["first"]) == INJECTED


def test_ratio_cap_keeps_most_frequent():
    model = TwoLinears()
    batches = outlier_batches()
    for (x,) in batches:
        x[:8, INJECTED[0]] /= 1000.0  # channel 5 now hits on half the tokens
    channels = calibrate(model, batches, strategy="mean_times", threshold=20.0, max_ratio=1 / 64)
    assert channels["first"] == [INJECTED[1]]


def test_ratio_by_fqn_prefix():
    model = TwoLinears()
    channels = calibrate(model, outlier_batches(), threshold=20.0, max_ratio={"first": 4 / 64})
    assert sorted(channels["first"]) == INJECTED
    assert channels["second"] == []


def test_calibrate_leaves_mode_and_runs_without_grad():
    model = TwoLinears().train()
    calibrate(model, [{"x": batch[0]} for batch in outlier_batches(1)], threshold=20.0, max_ratio=4 / 64)
    assert model.training
    assert all(parameter.grad is None for parameter in model.parameters())


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError, match="mean_times"):
        calibrate(TwoLinears(), outlier_batches(1), strategy="median")


def test_normalize_fqn_through_peft():
    assert normalize_fqn("base_model.model.model.layers.0.mlp.up_proj.base_layer") == "model.layers.0.mlp.up_proj"
    assert normalize_fqn("model.layers.0.mlp.up_proj") == "model.layers.0.mlp.up_proj"


def test_json_round_trip(tmp_path):
    channels = {"model.layers.0.mlp.up_proj": [3, 17], "lm_head": []}
    path = save_outlier_channels(channels, tmp_path / "channels.json")
    assert load_outlier_channels(path) == channels


def test_reference_format_file(tmp_path):
    path = tmp_path / "outliers.pt"
    torch.save({"model.layers.0.mlp.up_proj": [3, 17]}, path)
    assert load_outlier_channels(path) == {"model.layers.0.mlp.up_proj": [3, 17]}


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        quaff_compile.QuaffConfig(outlier_channels=str(tmp_path / "missing.json"))


def test_supplied_channels_match_through_peft(tmp_path):
    bare = tiny_llama()
    channels = calibrate(bare, [{"input_ids": INPUTS}], threshold=10.0, max_ratio=0.05)
    assert channels["model.layers.0.mlp.up_proj"] == [3, 17]
    path = save_outlier_channels(channels, tmp_path / "channels.json")

    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="quaff", options={**TINY_OPTIONS, "outlier_channels": str(path)})
    compiled(input_ids=INPUTS, labels=INPUTS).loss.backward()
    states = quaff_compile.layer_states(model)
    for fqn, state in states.items():
        expected = sorted(channels[normalize_fqn(fqn)])[: state.outlier_slots.numel()]
        assert state.outlier_channels == expected, fqn


def test_out_of_range_channel_names_layer():
    model = tiny_peft_llama()
    options = {**TINY_OPTIONS, "outlier_channels": {"model.layers.0.mlp.up_proj": [3, 999]}}
    compiled = torch.compile(model, backend="quaff", options=options)
    with pytest.raises(Exception, match=r"layers\.0\.mlp\.up_proj.*\[999\].*out of range"):
        compiled(input_ids=INPUTS, labels=INPUTS)


def train_steps(compiled, model, steps):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        compiled(input_ids=INPUTS, labels=INPUTS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_state_dict_restores_before_and_after_compile():
    model = tiny_peft_llama()
    compiled = torch.compile(model, backend="quaff", options=TINY_OPTIONS)
    train_steps(compiled, model, 2)
    saved = quaff_compile.state_dict(model)
    up_proj = saved["base_model.model.model.layers.0.mlp.up_proj.base_layer"]
    assert up_proj["outlier_channels"] == [3, 17]
    assert up_proj["updates"] == 2
    assert all(scale > 1 for scale in up_proj["smooth_scale"])

    before = tiny_peft_llama()
    quaff_compile.load_state_dict(before, saved)
    with torch.no_grad():
        torch.compile(before, backend="quaff", options=TINY_OPTIONS)(input_ids=INPUTS)
    assert quaff_compile.state_dict(before) == saved

    after = tiny_peft_llama(seed=0, outlier_channels=(9, 30))
    compiled_after = torch.compile(after, backend="quaff", options=TINY_OPTIONS)
    with torch.no_grad():
        compiled_after(input_ids=INPUTS)
    quaff_compile.load_state_dict(after, saved)
    assert quaff_compile.state_dict(after) == saved


def test_load_state_dict_unknown_layer():
    with pytest.raises(ValueError, match="does not have"):
        quaff_compile.load_state_dict(tiny_peft_llama(), {"model.layers.9.mlp.up_proj": {}})
