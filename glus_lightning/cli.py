"""The ``glus`` command line: ``glus <command> [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from glus_lightning.config import ConfigError, compose, to_yaml

RUN_COMMANDS = {
    "fit": "train (the built-in default with no arguments), then validate",
    "validate": "J, F and J&F on the validation split (ckpt_path=... for trained weights)",
}


def build_parser() -> argparse.ArgumentParser:
    from datamodules.prepare import configure_prepare_parser

    parser = argparse.ArgumentParser(
        prog="glus",
        description="GLUS referring video object segmentation. Run commands take config overrides: "
        "group=choice (experiment, backbone, segmenter, data, trainer) and dotted.key=value.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    configure_prepare_parser(sub.add_parser("prepare", help="convert a dataset (or generate the synthetic one) into WebDataset shards"))
    for name, help_text in RUN_COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. experiment=demo trainer.max_steps=100")
        cmd.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        from datamodules.prepare import run_prepare

        return run_prepare(args)
    try:
        cfg = compose(args.overrides)
    except ConfigError as err:
        print(f"glus {args.command}: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from glus_lightning import runner

    getattr(runner, args.command)(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
