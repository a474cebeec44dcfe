"""The ``eecnn`` command: LightningCLI over the eecnn models and the CIFAR-10 DataModule."""

import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from early_exit.agent import ExitAgent
from early_exit.checkpoint import init_args, model_args, read_checkpoint
from early_exit.classifier import EarlyExitClassifier
from early_exit.data import CIFAR10DataModule, ImageFilesDataModule
from early_exit.errors import InputError
from early_exit.inference import PredictionTable


def default_precision() -> str:
    """bf16 mixed precision where the hardware runs it natively, else fp32.

    On CPUs without AVX-512 BF16 or AMX, oneDNN has no bf16 convolutions and PyTorch falls back to
    a reference kernel about 20x slower than fp32, so bf16 must not be the blind default.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


class EarlyExitCLI(LightningCLI):
    """LightningCLI with eecnn's defaults: TensorBoard under ``logs/``, best and last checkpoints, step LR
    logging, and the model and data settings read from ``--ckpt_path`` so a checkpoint is enough to test it."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            L.LightningModule,
            None,  # any LightningDataModule, and optional: the exit agent replays cached outputs (data: null)
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the models configure their own optimisers
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({
            "model": {"class_path": _class_path(EarlyExitClassifier)},
            "data": {"class_path": _class_path(CIFAR10DataModule)},
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "epoch{epoch:03d}-val_acc{val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "lr_monitor.logging_interval": "step",
            "trainer.precision": default_precision(),
            "trainer.logger": {
                "class_path": _class_path(TensorBoardLogger),
                "init_args": {"save_dir": "logs", "name": "eecnn"},
            },
        })

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument("inputs", nargs="*", default=[],
                                help="image files, folders or glob patterns to predict with an exit agent checkpoint")
            parser.add_argument("--output", default=None, help="also save the predictions as .jsonl or .csv")
        return parser

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.subcommand != "predict":
            return
        config = self.config.predict
        if not isinstance(self.model, ExitAgent):
            if config.inputs:
                raise InputError("predicting image files needs an exit agent: pass --ckpt_path <agent.ckpt> "
                                 "(a classifier checkpoint predicts its datamodule's test split, with no files)")
            return
        if not config.inputs:
            raise InputError("eecnn predict with an exit agent needs image files, folders or globs: "
                             "eecnn predict --ckpt_path <agent.ckpt> image.png images/")
        self.trainer.callbacks.append(PredictionTable(config.output))
        self.datamodule = ImageFilesDataModule(config.inputs)

    def after_predict(self) -> None:
        if isinstance(self.datamodule, ImageFilesDataModule) and self.datamodule.errors:
            sys.exit(1)  # each failure already has its line; the readable images were predicted

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        subcommand = argv[0] if argv and argv[0] in self.subcommands() else None
        ckpt_path = _option(argv, "--ckpt_path")
        if subcommand and ckpt_path:
            checkpoint = read_checkpoint(ckpt_path)
            model = checkpoint["hyper_parameters"]
            data = checkpoint.get("datamodule_hyper_parameters")  # None for models that bring their own data
            self._subcommand_parsers[subcommand].set_defaults({
                "model": {"class_path": model["_class_path"], "init_args": model_args(checkpoint, ckpt_path)},
                "data": data and {"class_path": data.get("_class_path", _class_path(CIFAR10DataModule)),
                                  "init_args": init_args(data)},
            })
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Lightning would re-apply the checkpoint's hyper-parameters over the parsed config, silently undoing
        flags such as ``--model.classifier_ckpt``; ``parse_arguments`` already made them overridable defaults."""


def main(args: list[str] | None = None) -> None:
    try:
        EarlyExitCLI(args)
    except InputError as err:
        sys.exit(f"eecnn: error: {err}")


if __name__ == "__main__":
    main()
