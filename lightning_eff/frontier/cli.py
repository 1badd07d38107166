"""`lightning-eff-frontier SWEEP_DIR`: print (and rewrite) the frontier report of a finished sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_eff.frontier.report import write_frontier


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `lightning-eff-frontier` console script."""
    parser = argparse.ArgumentParser(
        prog="lightning-eff-frontier",
        description="The Pareto-optimal trials of a lightning-eff sweep (quality vs model bytes, vs step time).",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory (multirun/<date>_<time>)")
    parser.add_argument(
        "--quality", help="a figure of each report's run section (default: the sweep's frontier.quality)"
    )
    parser.add_argument("--maximize", action="store_true", help="higher quality is better (an accuracy)")
    args = parser.parse_args(argv)
    if not any(args.sweep_dir.glob("*/.hydra/overrides.yaml")):
        print(f"lightning-eff-frontier: error: {args.sweep_dir} holds no sweep jobs (*/.hydra/overrides.yaml)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    direction = "maximize" if args.maximize else ("minimize" if args.quality else None)
    _, text = write_frontier(args.sweep_dir, args.quality, direction)
    print(text)
