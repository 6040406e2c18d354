"""What Inductor makes of the rewritten linears: read from the generated C++ wrapper code.

Per rewritten linear and per matmul, the code must hold one `_int_mm` call.
The int8 operand of each call is written by one generated kernel, which also
computes its per-token scale (the `amax`), rounds and casts. The int32 result
is read by one kernel, which dequantizes, adds the bias, and for a layer with
outlier slots writes the input of the `addmm` that adds the correction term.
The tests force `matmul="int_mm"`, since "auto" emulates the int8 product
with fp32 matmuls on CPUs without an int8 matrix unit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch._inductor.utils import run_and_get_code

from tests.conftest import TINY_OPTIONS, tiny_peft_llama

INT_MM_OPTIONS = {**TINY_OPTIONS, "matmul": "int_mm"}

_KERNEL_DEFINITION = re.compile(
    r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(.*?\n.*?void\s+kernel\(([^)]*)\)", re.M | re.S
)
_CALL = re.compile(r"^\s+(?:extern_kernels\.(\w+)|(cpp_fused_\w+))\((.*)\)$")
_ALIAS = re.compile(r"^\s+(buf\d+) = (?:reinterpret_tensor\()?(buf\d+)\b")


@dataclass
class Call:
    name: str
    kernel: bool  # True for a generated kernel, False for an extern call
    reads: list[str]
    writes: list[str]


def _root(name: str, aliases: dict[str, str]) -> str:
    while name in aliases:
        name = aliases[name]
    return name


def _argument_name(argument: str) -> str:
    argument = argument.strip()
    argument = argument.removeprefix("reinterpret_tensor(")
    return re.match(r"[\w.]*", argument).group(0)


def parse_calls(code: str) -> list[list[Call]]:
    """Return the calls of each `call` function of a generated module, in order.

    A kernel's parameters are named `in_ptr`, `out_ptr` or `in_out_ptr` in its
    C signature, which shows what it reads and writes.
    """
    roles = {}
    for name, parameters in _KERNEL_DEFINITION.findall(code):
        names = [parameter.split()[-1].lstrip("*") for parameter in parameters.split(",")]
        roles[name] = [("in_" in name or name.startswith("in"), "out" in name) for name in names]
    functions = []
    for body in re.findall(r"    def call\(self, args\):\n(.*?)\n        return ", code, re.S):
        calls, aliases = [], {}
        for line in body.splitlines():
            alias = _ALIAS.match(line)
            if alias and "empty_strided" not in line:
                aliases[alias.group(1)] = alias.group(2)
                continue
            match = _CALL.match(line)
            if not match:
                continue
            extern, kernel, arguments = match.groups()
            if kernel:
                names = [_root(_argument_name(part), aliases) for part in arguments.split(", ")]
                reads = [name for name, (read, _) in zip(names, roles[kernel]) if read]
                writes = [name for name, (_, write) in zip(names, roles[kernel]) if write]
                calls.append(Call(kernel, True, reads, writes))
            else:
                out = re.search(r"out=(\w+)", arguments).group(1)
                positional = [part for part in arguments.split(", ") if "=" not in part]
                reads = [_root(_argument_name(part), aliases) for part in positional]
                calls.append(Call(extern, False, reads, [_root(out, aliases)]))
        functions.append(calls)
    return functions


def check_int_mm_calls(calls: list[Call], scale_in_kernel: bool = True) -> list[tuple[Call, Call, Call]]:
    """Check each `_int_mm` call's neighbours; return (quantize kernel, _int_mm, dequantize kernel) triples.

    With `scale_in_kernel`, the kernel that writes the int8 operand must also
    compute its per-token scale (an `amax`).
    """
    triples = []
    for index, call in enumerate(calls):
        if call.name != "_int_mm":
            continue
        operand, result = call.reads[0], call.writes[0]
        # Buffers are reused once dead, so look back to the last write of the
        # operand, and forward until the result's buffer is written again.
        quantize = next(other for other in reversed(calls[:index]) if operand in other.writes)
        assert quantize.kernel, f"{operand} is written by the extern call {quantize.name}"
        for part in ("amax", "round", "_to_copy") if scale_in_kernel else ("round", "_to_copy"):
            assert f"_{part}" in quantize.name, f"{quantize.name} lacks {part}"
        readers = []
        for other in calls[index + 1:]:
            if result in other.reads:
                readers.append(other)
            if result in other.writes:
                break
        assert len(readers) == 1, f"the int32 result {result} is read by {[r.name for r in readers]}"
        dequantize = readers[0]
        assert dequantize.kernel, f"{result} is read by the extern call {dequantize.name}"
        assert "_mul" in dequantize.name
        triples.append((quantize, call, dequantize))
    return triples


def generated_code(model, inputs, options):
    compiled = torch.compile(model, backend="quaff", options=options)

    def step():
        output = compiled(inputs)
        output = output.logits if hasattr(output, "logits") else output
        output.float().square().mean().backward()

    _, codes = run_and_get_code(step)
    return codes


class TwoFrozen(torch.nn.Module):
    """A trainable layer, a frozen linear with a bias and outliers, a frozen linear without a bias, a trainable head."""

    def __init__(self):
        super().__init__()
        self.pre = torch.nn.Linear(64, 64)
        self.smoothed = torch.nn.Linear(64, 96)
        self.plain = torch.nn.Linear(96, 32, bias=False)
        self.head = torch.nn.Linear(32, 8)
        for layer in (self.smoothed, self.plain):
            layer.requires_grad_(False)

    def forward(self, x):
        h = self.pre(x) + x
        return self.head(torch.relu(self.plain(torch.relu(self.smoothed(h)))))


def two_frozen_inputs():
    torch.manual_seed(0)
    model = TwoFrozen()
    x = torch.randn(4, 24, 64)
    x[..., 3] *= 500.0
    return model, x


def test_forward_fused_per_linear():
    model, x = two_frozen_inputs()
    forward, backward = (parse_calls(code) for code in generated_code(model, x, INT_MM_OPTIONS))
    (forward,), (backward,) = forward, backward

    triples = check_int_mm_calls(forward)
    assert len(triples) == 2
    (_, _, smoothed_dequantize), (_, _, plain_dequantize) = triples
    # The bias goes into the dequantize kernel; the layer without one adds nothing there.
    assert "_add" in smoothed_dequantize.name
    assert "_add" not in plain_dequantize.name
    # The correction term of the smoothed layer is one addmm onto the dequantized output.
    output = smoothed_dequantize.writes[0]
    consumers = [call for call in forward if output in call.reads]
    assert [(call.name, call.reads[0]) for call in consumers] == [("addmm", output)]


def test_backward_fused_per_linear():
    model, x = two_frozen_inputs()
    _, backward = (parse_calls(code) for code in generated_code(model, x, INT_MM_OPTIONS))
    (backward,) = backward
    # Both frozen linears pass a gradient to their input: `pre` is trainable.
    assert len(check_int_mm_calls(backward)) == 2


def test_peft_llama_int_mm_count():
    model = tiny_peft_llama()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    functions = [calls for code in generated_code(model, ids, INT_MM_OPTIONS) for calls in parse_calls(code)]
    forward, backward = functions
    # 2 layers of 7 frozen projections, all with outlier slots. Where several
    # layers read one input (q, k and v, or gate and up), Inductor may compute
    # their per-token amax in one shared reduction kernel. So only the simple
    # model above requires the amax and the rounding in one kernel.
    assert len(check_int_mm_calls(forward, scale_in_kernel=False)) == 14
    # Layer 0's q, k and v read the frozen embedding through a frozen norm, so
    # their input needs no gradient. The other 11 inputs do.
    assert len(check_int_mm_calls(backward, scale_in_kernel=False)) == 11
