"""Outlier channels of SmolLM2 (the main job's model): offline against online calibration, and their stability.

Offline: `quaff_compile.calibrate` with the mean_times rule over training
batches, on the LoRA-wrapped model. Online: the quaff backend's own choice
during the first `online_calibration_steps` training steps of a LoRA
fine-tune on the same batches. The benchmark reports, per layer, the Jaccard
overlap of the two sets, and the stability monitor's overlap of each step's
top channels with the chosen ones. It prints a summary and ends with one
JSON line.

    python bench/outliers.py --steps 30 --plots runs/outliers --json runs/outliers.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quaff_compile  # noqa: E402
from bench.harness import finish, load_main_job  # noqa: E402
from quaff_compile.calibration import normalize_fqn  # noqa: E402
from quaff_compile.data import batch_iterator  # noqa: E402
from quaff_compile.finetune import _make_peft_model, compile_model, write_plots  # noqa: E402


def jaccard(first, second) -> float:
    first, second = set(first), set(second)
    union = first | second
    return len(first & second) / len(union) if union else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps (default: %(default)s)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="offline batches (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--plots", type=Path, help="write loss.png and stability.png to this folder")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    base_model, _, train_rows, _ = load_main_job(seq_len=args.seq_len)
    model = _make_peft_model(base_model, lora_r=8, seed=0)
    batches = list(batch_iterator(train_rows, args.batch_size, args.steps, seed=0))

    offline = calibrate_offline(model, batches[: args.calibration_batches])

    compiled = compile_model(model, "quaff", {}, "regional")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for batch in batches:
        loss = compiled(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    online = {normalize_fqn(fqn): state.outlier_channels for fqn, state in quaff_compile.layer_states(model).items()}
    overlaps = {fqn: jaccard(channels, offline.get(fqn, [])) for fqn, channels in online.items()}
    with_channels = [fqn for fqn in online if online[fqn] or offline.get(fqn)]
    stability = quaff_compile.stability_report(model)
    step_means = {fqn: statistics.fmean(values) for fqn, values in stability.items() if values}
    worst = min(step_means, key=step_means.get)

    print(f"layers quantized: {len(online)}; with outlier channels online: {sum(1 for c in online.values() if c)}, "
          f"offline: {sum(1 for fqn in online if offline.get(fqn))}")
    print(f"online/offline Jaccard overlap over the {len(with_channels)} layers where either has channels: "
          f"mean {statistics.fmean(overlaps[fqn] for fqn in with_channels):.3f}")
    print(f"stability over {args.steps} steps: mean {statistics.fmean(step_means.values()):.3f} over "
          f"{len(step_means)} layers; worst {worst} ({step_means[worst]:.3f})")
    for fqn in with_channels[:12]:
        print(f"  {fqn}: online {online[fqn]}, offline {offline.get(fqn, [])}")

    if args.plots is not None:
        write_plots(args.plots, {"losses": losses, "outlier_stability": stability})
    finish(
        {
            "layers": len(online),
            "layers_with_channels_online": sum(1 for c in online.values() if c),
            "layers_with_channels_offline": sum(1 for fqn in online if offline.get(fqn)),
            "online_offline_jaccard_mean": statistics.fmean(overlaps[fqn] for fqn in with_channels) if with_channels else 1.0,
            "stability_mean": statistics.fmean(step_means.values()),
            "stability_worst_layer": worst,
            "stability_worst_mean": step_means[worst],
            "losses": losses,
        },
        args.json,
    )
    return 0


def calibrate_offline(model, batches) -> dict[str, list[int]]:
    channels = quaff_compile.calibrate(model, [{"input_ids": batch["input_ids"]} for batch in batches])
    return {normalize_fqn(fqn): value for fqn, value in channels.items()}


if __name__ == "__main__":
    sys.exit(main())
