"""How long a calibrated mode's calibration takes, without the cache, and where the time goes.

    python -m tools.calibration_time --modes int4-gptq,int4-awq [--tokens N] [--group-size 64] [--profile]

Loads the float model once per mode, reads the calibration text (QS_CALIBRATION_FILE, default
Python's `pydoc_data.topics`) and runs the mode's `calibrate` on the budget (QS_CALIBRATION_TOKENS,
default 32,768) with 2 torch threads. Nothing is read from or written to the calibration cache,
so every run is a first start's cost. Prints the seconds per mode, the load average before and
after (the figure is only worth quoting on a quiet machine), and with `--profile` the functions
that took the most time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import torch

from quant.calibration import calibration_sequences, read_calibration_text
from quant.checkpoints import DEFAULT_MODEL, default_cache_dir, load_float_model
from quant.config import QuantOptions, knob_default
from quant.registry import make_config


def time_mode(mode: str, text: str, label: str, args: argparse.Namespace) -> float:
    model, tokenizer, _ = load_float_model(args.model, args.cache_dir)  # fresh: calibrate changes the model
    sequences = calibration_sequences(tokenizer, text, args.tokens, label=label)
    config = make_config(mode, QuantOptions(group_size=args.group_size))
    if not config.calibrated:
        raise SystemExit(f"{mode} is not a calibrated mode")
    profile = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profile is not None:
        profile.enable()
    _, details = config.calibrate(model, sequences)
    if profile is not None:
        profile.disable()
    seconds = time.perf_counter() - started
    print(f"{mode}: {seconds:.1f} s for {sequences.numel()} tokens of {label}; {details}")
    if profile is not None:
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(12)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.calibration_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="int4-gptq,int4-awq", help="comma-separated calibrated modes")
    parser.add_argument("--tokens", type=int, default=knob_default("calibration_tokens"))
    parser.add_argument("--calibration-file", default=knob_default("calibration_file"))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print the functions that took the most time")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    text, label = read_calibration_text(args.calibration_file)
    for mode in args.modes.split(","):
        time_mode(mode.strip(), text, label, args)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
