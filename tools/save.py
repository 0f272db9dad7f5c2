"""`quantserve-save`: quantize a model once and write it in our pre-quantized format (`quant.saved`).

    quantserve-save --model M --precision int4 --out DIR [--group-size 32 ...]
    QS_MODEL=DIR quantserve        # serves it without building the float model

The model is loaded exactly as the service would load it with these settings (`app.model_loader`),
so what is saved is what `QS_PRECISION=P` serves today; `--precision native` saves a GGUF's own types.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from app.model_loader import load_model
from app.settings import SettingsError, load_settings
from quant.checkpoints import DEFAULT_MODEL, default_cache_dir
from quant.config import QuantOptions
from quant.saved import save_quantized


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantserve-save", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="as QS_MODEL (default: the embedded model)")
    parser.add_argument("--precision", required=True, help="as QS_PRECISION")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (created)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="default: QS_CACHE_DIR")
    QuantOptions.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    knobs = {name: getattr(args, name) for name in QuantOptions.knob_names()}
    if args.out.exists() and any(args.out.iterdir()):
        print(f"quantserve-save: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        settings = load_settings(
            model=args.model, precision=args.precision, device="cpu", cache_dir=args.cache_dir, **knobs
        )
        loaded = load_model(settings)
        save_quantized(
            loaded.model,
            loaded.tokenizer,
            loaded.report,
            args.out,
            options=settings.quant_options("cpu"),
            source_model=args.model,
            model_id=loaded.model_id,
            calibration=asdict(loaded.report.calibration) if loaded.report.calibration else None,
        )
    except (SettingsError, ValueError, RuntimeError) as error:
        print(f"quantserve-save: {error}", file=sys.stderr)
        return 2
    print(f"saved {loaded.report.mode} ({loaded.report.total_weight_bytes / 2**20:.1f} MiB of weights) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
