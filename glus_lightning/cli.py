"""The ``glus`` command line: ``glus <command> [key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from omegaconf import DictConfig

from glus_lightning.config import ConfigError, compose, to_yaml

RUN_COMMANDS = {
    "fit": "train (the built-in default with no arguments), then validate",
    "validate": "J, F and J&F on the validation split (ckpt_path=... for trained weights)",
    "test": "Lightning test loop over data.val: test/J, test/F, test/J&F (ckpt_path=... for trained weights)",
}
CSV_COMMANDS = ("validate", "test")


def compose_or_report(command: str, overrides: list[str], check: Callable[[DictConfig], None] | None = None) -> DictConfig | None:
    """The composed config (``check`` may raise ``ConfigError`` on it), or None after printing the error for ``glus command``."""
    try:
        cfg = compose(overrides)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        print(f"glus {command}: config error: {err}", file=sys.stderr)
        return None
    return cfg


def build_parser() -> argparse.ArgumentParser:
    from datamodules.prepare import configure_prepare_parser
    from glus_lightning.checkpoints.export import configure_export_parser
    from glus_lightning.checkpoints.importers import configure_import_parser
    from glus_lightning.evaluation import configure_evaluate_parser
    from glus_lightning.inference.command import configure_predict_parser
    from glus_lightning.refinement import configure_refine_parser

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
        if name in CSV_COMMANDS:
            cmd.add_argument("--csv", default=None, help="also write per-expression, video and overall scores to this CSV")
    configure_evaluate_parser(sub.add_parser("evaluate", help="J, F and J&F of saved prediction PNGs against official ground truth"))
    configure_import_parser(sub.add_parser("import", help="convert published weights (LISA-7B-v1, GLUS releases) into loadable files"))
    configure_predict_parser(sub.add_parser("predict", help="segment videos (masks, overlay, summary) or write a server submission"))
    configure_refine_parser(sub.add_parser("refine-scores", help="keyframe self-refinement: fit the frame scorer to the "
                                           "model's own per-frame IoU on training videos, write a checkpoint with it"))
    configure_export_parser(sub.add_parser("export", help="merge LoRA and write a Hugging Face model + SAM2/heads safetensors"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare":
        from datamodules.prepare import run_prepare

        return run_prepare(args)
    if args.command == "evaluate":
        from glus_lightning.evaluation import run_evaluate

        return run_evaluate(args)
    if args.command == "predict":
        from glus_lightning.inference.command import run_predict

        return run_predict(args)
    if args.command == "refine-scores":
        from glus_lightning.refinement import run_refine

        return run_refine(args)
    if args.command == "export":
        from glus_lightning.checkpoints.export import run_export

        return run_export(args)
    if args.command == "import":
        from glus_lightning.checkpoints.importers import run_import

        return run_import(args)
    cfg = compose_or_report(args.command, args.overrides)
    if cfg is None:
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from glus_lightning import runner

    getattr(runner, args.command)(cfg, **({"csv": args.csv} if args.command in CSV_COMMANDS else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
