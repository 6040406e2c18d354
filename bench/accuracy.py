"""Accuracy of quaff against fp32 and two int8 baselines on SmolLM2, the main job's default model.

Variants:
- fp32: the model as loaded;
- int8_per_token: the quaff backend with no outlier channels (`outlier_max_ratio=0`),
  so plain per-token int8 activations and per-channel int8 weights;
- smoothquant: SmoothQuant-style static migration (alpha = 0.5) calibrated on
  training batches, then per-token int8 activations, as an eager module swap;
- quaff: the quaff backend with its defaults.
Every int8 variant keeps lm_head in float. For each variant the benchmark
reports the held-out perplexity of the main job's data, the same after
fine-tuning LoRA (r=8, all linears) for the same steps on the same batches,
and a 4-choice word-analogy accuracy built from `questions-words.txt` in the
gensim 4.4.0 wheel (distractors from the same section, scored by
log-likelihood). It prints a table and ends with one JSON line.

    python bench/accuracy.py --steps 30 --json runs/accuracy.json
"""

from __future__ import annotations

import argparse
import copy
import glob
import math
import random
import statistics
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import finish, load_main_job, print_table  # noqa: E402
from quaff_compile.data import batch_iterator  # noqa: E402
from quaff_compile.finetune import compile_model  # noqa: E402
from quaff_compile.numerics import int8_matmul, quantize_per_token, quantize_weight_per_channel  # noqa: E402

VARIANTS = ("fp32", "int8_per_token", "smoothquant", "quaff")
ANALOGY_SECTIONS = (
    "capital-common-countries",
    "capital-world",
    "family",
    "gram3-comparative",
    "gram7-past-tense",
    "gram8-plural",
)
ANALOGY_FILE = "gensim/test/test_data/questions-words.txt"
ANALOGY_TOKENS = 24  # every prompt plus candidate fits; a fixed shape avoids recompiles
SMOOTHQUANT_ALPHA = 0.5


# --- SmoothQuant baseline -------------------------------------------------


class _SmoothQuantFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, smooth, weight_qdata, weight_scale, bias, matmul):
        in_features = x.shape[-1]
        x_2d = x.reshape(-1, in_features).float() / smooth
        qdata, act_scale = quantize_per_token(x_2d)
        y = int8_matmul(qdata, weight_qdata.t(), matmul).float() * act_scale * weight_scale
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(smooth, weight_qdata, weight_scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        smooth, weight_qdata, weight_scale = ctx.saved_tensors
        weight = weight_qdata.float() * weight_scale[:, None] / smooth  # the effective W
        grad_2d = grad_output.reshape(-1, weight.shape[0]).float()
        grad_input = (grad_2d @ weight).to(ctx.x_dtype).reshape(ctx.x_shape)
        return grad_input, None, None, None, None, None


class SmoothQuantLinear(torch.nn.Module):
    """A frozen linear with SmoothQuant's static migration: X/s in per-token int8, W*s per channel."""

    def __init__(self, linear: torch.nn.Linear, act_absmax: torch.Tensor, alpha: float, matmul: str):
        super().__init__()
        weight = linear.weight.detach().float()
        weight_absmax = weight.abs().amax(dim=0).clamp_min(1e-5)
        smooth = (act_absmax.clamp_min(1e-5) ** alpha / weight_absmax ** (1 - alpha)).clamp_min(1e-5)
        weight_qdata, weight_scale = quantize_weight_per_channel(weight * smooth)
        self.register_buffer("smooth", smooth)
        self.register_buffer("weight_qdata", weight_qdata)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.matmul = matmul

    def forward(self, x):
        return _SmoothQuantFunction.apply(x, self.smooth, self.weight_qdata, self.weight_scale, self.bias, self.matmul)


def frozen_linears(model) -> dict[str, torch.nn.Linear]:
    """Return the frozen linears an int8 variant quantizes: all but lm_head and trainable ones."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and "lm_head" not in name
    }


def apply_smoothquant(model, calibration_batches, matmul: str) -> None:
    """Calibrate per-channel activation maxima, then swap each frozen linear for SmoothQuantLinear."""
    linears = frozen_linears(model)
    absmax = {}

    def observer(name):
        def hook(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], x) if name in absmax else x

        return hook

    handles = [module.register_forward_pre_hook(observer(name)) for name, module in linears.items()]
    with torch.no_grad():
        for batch in calibration_batches:
            model(input_ids=batch)
    for handle in handles:
        handle.remove()

    for name, module in linears.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, SmoothQuantLinear(module, absmax[name], SMOOTHQUANT_ALPHA, matmul))


# --- Variants, perplexity, fine-tuning ----------------------------------------


def prepare(variant: str, model, calibration_batches, matmul: str):
    """Turn `model` into `variant` in place and return what to call."""
    if variant == "fp32":
        return model
    if variant == "smoothquant":
        apply_smoothquant(model, calibration_batches, matmul)
        return model
    options = {"matmul": matmul}
    if variant == "int8_per_token":
        options["outlier_max_ratio"] = 0.0
    compiled = compile_model(model, "quaff", options, "regional")
    # A layer's first batch chooses its outlier channels, so make that a training batch.
    with torch.no_grad():
        compiled(input_ids=calibration_batches[0])
    return compiled


def held_out_loss(model, rows: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            batch = rows[start:start + batch_size]
            losses.append(model(input_ids=batch, labels=batch).loss.item())
    model.train(was_training)
    return statistics.fmean(losses)


def fine_tune(model, train_rows, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batch_iterator(train_rows, batch_size, steps, seed=seed):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def peft_copy(base_model, lora_r: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = copy.deepcopy(base_model)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear"))


# --- Word analogies ------------------------------------------------------------


def find_wheel(path: str | None) -> Path:
    if path:
        return Path(path)
    root = Path(__file__).resolve().parents[1]
    found = sorted(glob.glob(str(root / ".cache" / "wheels" / "gensim-4.4.0-*.whl")))
    if not found:
        raise SystemExit(
            "accuracy.py: the gensim 4.4.0 wheel is missing; run scripts/setup.sh, or "
            "`pip download --no-deps gensim==4.4.0 -d .cache/wheels`, or pass --wheel PATH"
        )
    return Path(found[0])


def load_analogy_items(wheel: Path, per_section: int, seed: int) -> list[tuple[str, list[str], int]]:
    """Return (prompt, four candidates, index of the right one) items from the wheel's analogy list."""
    text = zipfile.ZipFile(wheel).read(ANALOGY_FILE).decode()
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(":"):
            current = line[1:].strip()
            sections[current] = []
        elif current is not None and line.strip():
            sections[current].append(line.split())

    generator = random.Random(seed)
    items = []
    for name in ANALOGY_SECTIONS:
        questions = sections[name]
        answers = sorted({question[3] for question in questions})
        for a, b, c, d in generator.sample(questions, per_section):
            distractors = generator.sample([answer for answer in answers if answer not in (a, b, c, d)], 3)
            candidates = [d, *distractors]
            generator.shuffle(candidates)
            items.append((f"{a} is to {b} as {c} is to", candidates, candidates.index(d)))
    return items


def analogy_accuracy(model, tokenizer, items) -> float:
    """Return the share of items whose right candidate has the highest log-likelihood."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    correct = 0
    with torch.no_grad():
        for prompt, candidates, answer in items:
            prompt_length = len(tokenizer(prompt)["input_ids"])
            sequences = [tokenizer(f"{prompt} {candidate}")["input_ids"][:ANALOGY_TOKENS] for candidate in candidates]
            input_ids = torch.full((len(sequences), ANALOGY_TOKENS), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, sequence in enumerate(sequences):
                input_ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            scores = []
            for row, sequence in enumerate(sequences):
                positions = range(prompt_length - 1, len(sequence) - 1)
                scores.append(sum(log_probs[row, position, sequence[position + 1]].item() for position in positions))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == answer)
    return correct / len(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="fine-tuning steps per variant (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--analogies-per-section", type=int, default=40, help="items per section (default: %(default)s)")
    parser.add_argument("--matmul", default="auto", help="quaff matmul option for all int8 variants (default: %(default)s)")
    parser.add_argument("--wheel", help="path of the gensim 4.4.0 wheel (default: .cache/wheels/ from scripts/setup.sh)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from quaff_compile.backend import _resolve_matmul
    from quaff_compile.config import QuaffConfig

    matmul = _resolve_matmul(QuaffConfig(matmul=args.matmul), torch.device("cpu"))
    items = load_analogy_items(find_wheel(args.wheel), args.analogies_per_section, seed=0)
    base_model, tokenizer, train_rows, held_out_rows = load_main_job(seq_len=args.seq_len)
    base_model.requires_grad_(False)
    # A KV cache makes Dynamo recompile per layer (a guard on each cache
    # layer's state) until its recompile limit leaves the rest in eager float.
    base_model.config.use_cache = False
    calibration_batches = [train_rows[: args.batch_size], train_rows[args.batch_size: 2 * args.batch_size]]

    perplexity, perplexity_after, accuracy, loss_after, seconds = {}, {}, {}, {}, {}
    for variant in VARIANTS:
        start = time.perf_counter()
        torch._dynamo.reset()  # a fresh cache per variant: no graph reuse across backends
        model = prepare(variant, copy.deepcopy(base_model), calibration_batches, matmul)
        perplexity[variant] = math.exp(held_out_loss(model, held_out_rows, args.batch_size))
        accuracy[variant] = analogy_accuracy(model, tokenizer, items)
        del model

        torch._dynamo.reset()
        model = prepare(variant, peft_copy(base_model, args.lora_r, seed=0), calibration_batches, matmul)
        fine_tune(model, train_rows, args.steps, args.batch_size, args.lr, seed=0)
        loss_after[variant] = held_out_loss(model, held_out_rows, args.batch_size)
        perplexity_after[variant] = math.exp(loss_after[variant])
        seconds[variant] = time.perf_counter() - start
        del model
        print(
            f"{variant}: perplexity {perplexity[variant]:.3f}, after fine-tuning {perplexity_after[variant]:.3f}, "
            f"analogy accuracy {accuracy[variant]:.3f} ({seconds[variant]:.0f} s)",
            flush=True,
        )

    rows = []
    for variant in VARIANTS:
        rows.append(
            [
                variant,
                f"{perplexity[variant]:.3f}",
                f"{perplexity[variant] / perplexity['fp32'] - 1:+.2%}",
                f"{perplexity_after[variant]:.3f}",
                f"{loss_after[variant] / loss_after['fp32'] - 1:+.2%}",
                f"{accuracy[variant]:.3f}",
            ]
        )
    print()
    print_table(
        ["variant", "perplexity", "vs fp32", "perplexity after fine-tuning", "held-out loss vs fp32", "analogy accuracy"],
        rows,
    )
    finish(
        {
            "perplexity": perplexity,
            "perplexity_after_finetune": perplexity_after,
            "held_out_loss_after_finetune": loss_after,
            "analogy_accuracy": accuracy,
            "analogy_items": len(items),
            "steps": args.steps,
            "matmul": matmul,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
