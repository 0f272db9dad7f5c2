"""`quantserve-qat`: quantization-aware fine-tuning, saved as a checkpoint that `QS_MODEL` serves.

    python -m tools.qat --mode int4 --group-size 64 --out qat-int4-g64 --max-minutes 14
    QS_MODEL=qat-int4-g64 QS_PRECISION=int4 QS_GROUP_SIZE=64 quantserve

The student is the float model with its linears fake-quantized on the mode's exact grid
(`quant.qat`, straight-through gradients); the teacher is a frozen copy of the float model.
The loss is the KL divergence of the student's next-token distribution from the teacher's,
at every position of the calibration text (`--calibration-file`, `--calibration-tokens`, as
the calibrated modes read them). Training stops after `--steps` steps or `--max-minutes`,
whichever comes first. The saved float weights are the trained quantized weights (on the
grid), so round-to-nearest at serving time rebuilds exactly them; `qat.json` records the
mode, group size, steps, tokens seen and losses.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quant.calibration import CalibrationError, calibration_sequences, read_calibration_text
from quant.checkpoints import DEFAULT_MODEL, default_cache_dir, load_float_model
from quant.config import QuantOptions
from quant.qat import QAT_MODES, QatModeError, check_qat_mode, finish_qat, grid_mismatches, prepare_qat, round_tied_head
from quant.registry import make_config

TRAINED_PARTS = ("all", "linears", "norms")  # what the optimiser updates (the embedding stays frozen)


@dataclass
class QatResult:
    mode: str
    group_size: int
    model: str
    calibration_source: str
    steps: int
    tokens_seen: int
    sequence_length: int
    batch_size: int
    learning_rate: float
    trained: str
    bf16: bool
    trainable_parameters: int
    seconds: float
    first_loss: float
    last_loss: float  # mean KL (nats per token) of the last tenth of the steps
    head_rounded: bool
    losses: list[float] = field(default_factory=list)


def kl_from_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student), in nats."""
    student = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def trainable_parameters(model: nn.Module, trained: str) -> list[nn.Parameter]:
    """The parameters `trained` names; everything else is frozen. The tied embedding/head never trains."""
    embedding = model.get_input_embeddings().weight
    chosen = []
    for name, parameter in model.named_parameters():
        is_norm = "norm" in name and parameter.dim() == 1
        is_linear = "parametrizations.weight.original" in name or (name.endswith(".bias") and not is_norm)
        wanted = parameter is not embedding and (
            trained == "all" or (trained == "norms" and is_norm) or (trained == "linears" and is_linear)
        )
        parameter.requires_grad_(wanted)
        if wanted:
            chosen.append(parameter)
    return chosen


def train(
    student: nn.Module,
    teacher: nn.Module,
    sequences: torch.Tensor,
    *,
    steps: int,
    max_seconds: float,
    batch_size: int,
    learning_rate: float,
    parameters: list[nn.Parameter],
    bf16: bool = False,
    show_progress: bool = True,
) -> tuple[int, int, list[float], float]:
    """AdamW on the KL loss; the learning rate decays on a cosine over the run, measured in steps or in
    time, whichever bound is nearer, so a run stopped by `max_seconds` also ends annealed.
    Returns (steps done, tokens seen, losses, seconds)."""
    # fused: one pass over the parameters (the default for-loop AdamW costs as much as a step's matmuls)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0, fused=True)
    # bf16 matmuls (AMX / AVX-512 BF16 where the CPU has them) for speed; the weights, their grid,
    # the loss and the optimizer stay float32
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    student.train()
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    bar = tqdm(total=steps, unit="step", disable=not show_progress, file=sys.stderr)
    last_step_seconds = 0.0
    for step in range(steps):
        elapsed = time.perf_counter() - started
        if elapsed + last_step_seconds > max_seconds:  # the next step would end past the limit
            bar.write(f"stopping after {step} steps: --max-minutes reached")
            break
        progress = max(step / steps, elapsed / max_seconds)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * progress))
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % sequences.shape[0]
        batch = sequences[rows]
        with torch.no_grad(), autocast:
            teacher_logits = teacher(input_ids=batch).logits
        with autocast:
            student_logits = student(input_ids=batch).logits
        loss = kl_from_teacher(student_logits, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        last_step_seconds = time.perf_counter() - started - elapsed
        tokens += batch.numel()
        bar.update(1)
        bar.set_postfix(kl=f"{losses[-1]:.4f}", tokens=tokens)
    bar.close()
    student.eval()
    return len(losses), tokens, losses, time.perf_counter() - started


def run_qat(args: argparse.Namespace, options: QuantOptions) -> QatResult:
    config = make_config(args.mode, options)
    torch.manual_seed(args.seed)
    text, source = read_calibration_text(options.calibration_file)  # a bad file fails before loading
    student, tokenizer, model_id = load_float_model(args.model, args.cache_dir, "cpu")
    head_rounded = round_tied_head(student, config)
    sequences = calibration_sequences(tokenizer, text, options.calibration_tokens, args.sequence_length, source)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)  # the float model (its head as served)
    names = prepare_qat(student, config)
    parameters = trainable_parameters(student, args.train)
    print(
        f"QAT {config.name} g{config.group_size}: {len(names)} fake-quantized linears, "
        f"{sum(p.numel() for p in parameters):,} trainable parameters ({args.train}), "
        f"{sequences.numel()} calibration tokens of {source}",
        file=sys.stderr,
    )
    steps = args.steps or math.ceil(sequences.shape[0] / args.batch_size)
    done, tokens, losses, seconds = train(
        student,
        teacher,
        sequences,
        steps=steps,
        max_seconds=args.max_minutes * 60,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        parameters=parameters,
        bf16=args.bf16,
    )
    finish_qat(student)
    off_grid = {name: n for name, n in grid_mismatches(student, config).items() if n}
    if off_grid:  # serving would not reproduce the trained weights: never save such a checkpoint
        raise RuntimeError(f"weights off the {config.name} grid after training: {off_grid}")
    tail = losses[-max(1, len(losses) // 10) :] or [float("nan")]
    result = QatResult(
        mode=config.name,
        group_size=config.group_size,
        model=model_id,
        calibration_source=source,
        steps=done,
        tokens_seen=tokens,
        sequence_length=sequences.shape[1],
        batch_size=args.batch_size,
        learning_rate=args.lr,
        trained=args.train,
        bf16=args.bf16,
        trainable_parameters=sum(p.numel() for p in parameters),
        seconds=seconds,
        first_loss=losses[0] if losses else float("nan"),
        last_loss=sum(tail) / len(tail),
        head_rounded=head_rounded,
        losses=losses,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "qat.json").write_text(json.dumps(asdict(result), indent=1))
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="quantserve-qat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", required=True, help=f"precision mode to train for: {', '.join(QAT_MODES)}")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, hub id or .gguf (default: embedded)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (default: one pass over the text)")
    parser.add_argument("--max-minutes", type=float, default=14.0, help="stop training after this long")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    parser.add_argument("--sequence-length", type=int, default=512, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate (cosine decay)")
    parser.add_argument("--train", choices=TRAINED_PARTS, default="all", help="what trains (embedding: never)")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 matmuls in training (AMX/AVX-512 BF16: 2-3x faster on CPUs that have them); weights stay float32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: QS_CACHE_DIR")
    QuantOptions.add_arguments(parser)  # --group-size, --calibration-file, --calibration-tokens, ...
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        options = QuantOptions.from_arguments(args)
        check_qat_mode(make_config(args.mode, options))  # an unknown or unsupported mode fails before loading
        result = run_qat(args, options)
    except (QatModeError, CalibrationError, ValueError, KeyError) as error:
        print(f"quantserve-qat: {error}", file=sys.stderr)
        return 2
    print(
        f"{result.steps} steps, {result.tokens_seen} tokens seen in {result.seconds:.0f} s; "
        f"KL {result.first_loss:.4f} -> {result.last_loss:.4f}; saved {args.out}"
    )
    print(f"serve it: QS_MODEL={args.out} QS_PRECISION={result.mode} QS_GROUP_SIZE={result.group_size} quantserve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
