"""The ``glus`` command line: ``glus <command> [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial

from glus_lightning.config import compose_or_report, to_yaml

RUN_COMMANDS = {
    "fit": "train (the built-in default with no arguments), then validate",
    "validate": "J, F and J&F on the validation split (ckpt_path=... for trained weights)",
    "test": "Lightning test loop over data.val: test/J, test/F, test/J&F (ckpt_path=... for trained weights)",
}
CSV_COMMANDS = ("validate", "test")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand with its arguments; each sets ``args.handler``, the function that runs it."""
    from datamodules.prepare import configure_prepare_parser, run_prepare
    from glus_lightning.checkpoints.export import configure_export_parser, run_export
    from glus_lightning.checkpoints.importers import configure_import_parser, run_import
    from glus_lightning.evaluation import configure_evaluate_parser, run_evaluate
    from glus_lightning.inference.command import configure_predict_parser, run_predict
    from glus_lightning.keyframes.command import configure_refine_parser, run_refine

    parser = argparse.ArgumentParser(
        prog="glus",
        description="GLUS referring video object segmentation. Run commands take config overrides: "
        "group=choice (experiment, backbone, segmenter, data, trainer) and dotted.key=value.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None],
            handler: Callable[[argparse.Namespace], int]) -> None:
        configure(command := sub.add_parser(name, help=help_text))
        command.set_defaults(handler=handler)

    add("prepare", "convert a dataset (or generate the synthetic one) into WebDataset shards", configure_prepare_parser, run_prepare)
    for name, help_text in RUN_COMMANDS.items():
        add(name, help_text, partial(configure_run_parser, csv=name in CSV_COMMANDS), run_config_command)
    add("evaluate", "J, F and J&F of saved prediction PNGs against official ground truth", configure_evaluate_parser, run_evaluate)
    add("import", "convert published weights (LISA-7B-v1, GLUS releases) into loadable files", configure_import_parser, run_import)
    add("predict", "segment videos (masks, overlay, summary) or write a server submission", configure_predict_parser, run_predict)
    add("refine-scores", "keyframe self-refinement: fit the frame scorer to the model's own per-frame IoU on training videos, "
        "write a checkpoint with it", configure_refine_parser, run_refine)
    add("export", "merge LoRA and write a Hugging Face model + SAM2/heads safetensors", configure_export_parser, run_export)
    return parser


def configure_run_parser(parser: argparse.ArgumentParser, csv: bool) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. experiment=demo trainer.max_steps=100")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if csv:
        parser.add_argument("--csv", default=None, help="also write per-expression, video and overall scores to this CSV")


def run_config_command(args: argparse.Namespace) -> int:
    """``glus fit | validate | test``: compose the config, then hand it to the runner of the same name."""
    cfg = compose_or_report(args.command, args.overrides)
    if cfg is None:
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from datamodules.shards import ShardFormatError
    from glus_lightning import runner

    try:
        getattr(runner, args.command)(cfg, **({"csv": args.csv} if args.command in CSV_COMMANDS else {}))
    except ShardFormatError as err:  # prepared data of another shard format: the message says what to do, no traceback
        print(f"glus {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
