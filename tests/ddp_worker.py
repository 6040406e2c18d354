"""Train the tiny LoRA Llama under DistributedDataParallel, compiled with `backend="quaff"`.

Run from the repository root, on CPUs with the gloo backend:

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT.json

Every rank builds the same model from the same seed, wraps it in
DistributedDataParallel, compiles the wrapper with `backend="quaff"` and
`TINY_OPTIONS`, and trains `STEPS` steps on its own contiguous slice of
`BATCH`. Rank 0 writes a JSON object with one entry per rank: the losses of
its steps, the number of linears that ran in int8, and the sum of its
trainable parameters after training. `tests/test_ecosystem.py` starts this
script and compares the losses with one process training on all of `BATCH`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# Run as a script, Python puts tests/ (not the repository root) on sys.path,
# and the model builder lives in the `tests` package.
REPOSITORY_ROOT = str(Path(__file__).resolve().parents[1])
if REPOSITORY_ROOT not in sys.path:
    sys.path.insert(0, REPOSITORY_ROOT)

from quaff_compile import layer_states  # noqa: E402
from tests.conftest import TINY_OPTIONS, tiny_peft_llama  # noqa: E402

STEPS = 3
LEARNING_RATE = 1e-2
# Every row has the same length and no padding, so every rank's slice has
# the same number of label tokens. The mean of the per-rank mean losses is
# then the mean loss over the whole batch.
BATCH = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


def build_model() -> torch.nn.Module:
    return tiny_peft_llama(seed=0)


def train(compiled, model: torch.nn.Module, inputs: torch.Tensor, steps: int = STEPS) -> list[float]:
    """Train `steps` AdamW steps on `inputs` through `compiled` and return the loss of each step."""
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=LEARNING_RATE)
    losses = []
    for _ in range(steps):
        loss = compiled(input_ids=inputs, labels=inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def rank_slice(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    rows = batch.shape[0] // world_size
    return batch[rank * rows:(rank + 1) * rows]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT.json")
    output_path = Path(sys.argv[1])

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    if BATCH.shape[0] % world_size:
        sys.exit(f"the batch of {BATCH.shape[0]} rows does not split evenly over {world_size} processes")

    model = build_model()
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    compiled = torch.compile(ddp_model, backend="quaff", options=TINY_OPTIONS)
    losses = train(compiled, model, rank_slice(BATCH, rank, world_size))

    report = {
        "losses": losses,
        "int8_layers": len(layer_states(model)),
        "trainable_sum": sum(parameter.double().sum().item() for parameter in model.parameters() if parameter.requires_grad),
    }
    # NOTE: in torch 2.13, a gloo worker thread takes the GIL to drop its
    # reference to the Python tensors of a finished collective (all_gather,
    # all_gather_object). Deleting the DDP wrapper, whose reducer owns the
    # process group, joins that thread while holding the GIL, so a thread
    # that has not yet dropped its reference deadlocks the process. With
    # all_gather or all_gather_object here, 5 of 18 runs on a 2-core machine
    # hung. The ranks therefore exchange their reports through files, and the
    # only collective after training is a barrier, which moves no tensors.
    # The files need one file system for all ranks, so this runs on one machine.
    part_paths = [output_path.with_name(f"{output_path.name}.rank{index}") for index in range(world_size)]
    part_paths[rank].write_text(json.dumps(report))
    dist.barrier()
    if rank == 0:
        reports = [json.loads(path.read_text()) for path in part_paths]
        output_path.write_text(json.dumps({"world_size": world_size, "ranks": reports}, indent=2))
        for path in part_paths:
            path.unlink()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
