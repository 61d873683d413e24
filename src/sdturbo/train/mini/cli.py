"""`sdturbo train mini [--stage STAGE|all] [--workdir DIR] [--steps-scale F]`: the arguments of the `mini`
subcommand (cli.py adds the subparser and calls run_train)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from .stages import ABLATION_STAGES, DEFAULT_WORKDIR, STAGES


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stage",
        default="all",
        choices=["all", *STAGES, *ABLATION_STAGES],
        help="one stage, or all in order; adv_only / distill_only train the ablation students for `sdturbo eval`",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="checkpoints and logs (resumable)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--export-dir", type=Path, default=None, help="where 'export' writes (default: the bundled mini)")


def run_train(args: argparse.Namespace) -> int:
    from .config import MiniRecipe
    from .stages import run_all, run_stage

    recipe = MiniRecipe().scaled(args.steps_scale)
    if args.export_dir is not None:
        recipe = replace(recipe, export_dir=str(args.export_dir))
    if args.stage == "all":
        times = run_all(args.workdir, recipe)
    else:
        times = {args.stage: run_stage(args.stage, args.workdir, recipe)}
    for name, seconds in times.items():
        print(f"{name:10s} {seconds / 60:6.1f} min")
    print(f"{'total':10s} {sum(times.values()) / 60:6.1f} min")
    return 0
