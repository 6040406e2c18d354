"""`quaff_compile.explain` and the `quaff-inspect` command: what the backend would do to a model.

`explain` captures the model with Dynamo on the given inputs, runs the same
find and rewrite passes as the backend on a copy of each captured graph, and
reports the decision on every linear. It compiles nothing, runs the model
under `no_grad`, and creates or moves no layer state. Outlier channels of
layers without state are counted from the captured inputs, as the backend
would choose them, without storing them.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from quaff_compile.backend import copy_graph_module
from quaff_compile.config import QuaffConfig
from quaff_compile.passes.find_linears import ParameterResolver, find_linears
from quaff_compile.passes.observe_outliers import observe_outlier_channels
from quaff_compile.passes.rewrite_linears import rewrite_linears
from quaff_compile.state import get_layer_state, outlier_slots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearReport:
    """The backend's decision on one linear."""

    fqn: str
    node: str
    weight_shape: tuple[int, ...] | None
    decision: str  # "int8" or "float"
    reason: str
    outlier_channels: int


@dataclass
class GraphReport:
    """One captured graph, before and after the rewrite."""

    linears: list[LinearReport]
    code_before: str
    code_after: str


@dataclass
class ExplainReport:
    """Report of the quaff backend's decision on every linear of a model."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def linears(self) -> list[LinearReport]:
        return [linear for graph in self.graphs for linear in graph.linears]

    def totals(self) -> dict[str, int]:
        """Return counts of linears by decision and of float linears by reason."""
        counts = collections.Counter(linear.decision for linear in self.linears)
        totals = {"linears": len(self.linears), "int8": counts["int8"], "float": counts["float"]}
        for linear in self.linears:
            if linear.decision == "float":
                key = f"float: {linear.reason}"
                totals[key] = totals.get(key, 0) + 1
        totals["with outlier channels"] = sum(1 for linear in self.linears if linear.outlier_channels)
        totals["graphs"] = len(self.graphs)
        return totals

    def table(self) -> str:
        """Return one row per linear, starting with its fqn, then the totals."""
        header = ("fqn", "weight", "decision", "outliers", "reason")
        rows = [
            (
                linear.fqn or linear.node,
                "x".join(map(str, linear.weight_shape)) if linear.weight_shape else "-",
                linear.decision,
                str(linear.outlier_channels),
                linear.reason,
            )
            for linear in self.linears
        ]
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
        lines = []
        for row in [header, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row, widths)]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        lines.append("")
        lines += [f"{key}: {value}" for key, value in self.totals().items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def save(self, folder: str | Path) -> Path:
        """Write the table, the totals as JSON and each graph's code before and after the rewrite."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "linears.txt").write_text(self.table() + "\n")
        (folder / "totals.json").write_text(json.dumps(self.totals(), indent=2) + "\n")
        for index, graph in enumerate(self.graphs):
            (folder / f"graph_{index}_before.py").write_text(graph.code_before)
            (folder / f"graph_{index}_after.py").write_text(graph.code_after)
        return folder



def _explain_graph(gm: fx.GraphModule, example_inputs, config: QuaffConfig) -> GraphReport:
    gm = copy_graph_module(gm)
    code_before = gm.code
    matches = find_linears(gm, example_inputs, config, ParameterResolver())
    chosen = [match for match in matches if match.quantize]

    new = [match for match in chosen if get_layer_state(match.weight) is None]
    observed = observe_outlier_channels(
        gm, example_inputs, [match.key for match in new], config.outlier_threshold, config.outlier_max_ratio
    )
    linears = []
    for match in matches:
        weight_shape = tuple(match.linear_weight(match.weight).shape) if match.weight is not None else None
        outliers = 0
        if match.quantize:
            state = get_layer_state(match.weight)
            outliers = state.num_outliers if state is not None else len(observed.get(match.key, []))
        linears.append(
            LinearReport(
                fqn=match.fqn,
                node=match.node.name,
                weight_shape=weight_shape,
                decision="int8" if match.quantize else "float",
                reason="frozen weight served by torch._int_mm" if match.quantize else match.reason,
                outlier_channels=outliers,
            )
        )

    smoothed = [
        outlier_slots(match.linear_weight(match.weight).shape[1], config.outlier_max_ratio) > 0 for match in chosen
    ]
    rewrite_linears(gm, list(zip(chosen, smoothed)), momentum=config.momentum, matmul="int_mm")
    return GraphReport(linears=linears, code_before=code_before, code_after=gm.code)


def explain(model: torch.nn.Module, *args, options: dict | None = None, **kwargs) -> ExplainReport:
    """Report what `torch.compile(model, backend="quaff", options=options)` would do on these inputs."""
    config = QuaffConfig.from_options(options)
    report = ExplainReport()

    def record(gm, example_inputs, **compile_kwargs):
        report.graphs.append(_explain_graph(gm, example_inputs, config))
        return gm.forward

    captured = torch.compile(model, backend=record, dynamic=False)
    with torch.no_grad():
        captured(*args, **kwargs)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quaff-inspect",
        description="Print which linears of a model the quaff backend turns into int8, and why the others stay float.",
    )
    parser.add_argument("--model", help="Hugging Face model folder or GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens in the sample input (default: %(default)s)")
    parser.add_argument(
        "--lora-r",
        type=int,
        default=8,
        help="wrap the model with LoRA of this rank on all linears first, as for fine-tuning; 0 freezes "
        "the whole model instead (default: %(default)s)",
    )
    parser.add_argument("--save", type=Path, help="also write the table and the graphs before and after to this folder")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="quaff backend option (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from quaff_compile.data import load_examples, tokenize_examples
    from quaff_compile.finetune import _make_peft_model, parse_options
    from quaff_compile.models import load_model_and_tokenizer

    args = build_parser().parse_args(argv)
    if args.seq_len < 1:
        raise SystemExit(f"quaff-inspect: --seq-len must be at least 1, got {args.seq_len}")
    options = parse_options(args.option)

    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.lora_r > 0:
        model = _make_peft_model(model, args.lora_r, seed=0)
    else:
        model.requires_grad_(False)
    model.eval()

    tokens = [token for sequence in tokenize_examples(tokenizer, load_examples(None)[:50]) for token in sequence]
    input_ids = torch.tensor([tokens[: args.seq_len]])
    report = explain(model, input_ids=input_ids, options=options)
    print(report)
    if args.save is not None:
        print(f"wrote {report.save(args.save)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
