"""The ``eecnn`` command: LightningCLI over the eecnn models and the CIFAR-10 DataModule."""

import argparse
import contextlib
import inspect
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from early_exit.agent import ExitAgent
from early_exit.checkpoint import data_args, model_args, read_checkpoint
from early_exit.classifier import EarlyExitClassifier
from early_exit.data import CIFAR10DataModule, ImageFilesDataModule
from early_exit.errors import InputError
from early_exit.inference import EarlyExitPredictor, PredictionTable
from early_exit.report import EarlyExitReport


def default_precision() -> str:
    """bf16 mixed precision where the hardware runs it natively, else fp32.

    On CPUs without AVX-512 BF16 or AMX, oneDNN has no bf16 convolutions and PyTorch falls back to
    a reference kernel about 20x slower than fp32, so bf16 must not be the blind default.
    """
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


DESCRIPTION = """eecnn: a CIFAR-10 classifier with an exit after each of its 4 stages, and a learned (DQN) agent that
stops each image at the first exit it trusts. The shipped pair, from the repository root:

  eecnn test --ckpt_path results/agent.ckpt                 accuracy, FLOPs saved, exits, plots: logs/eecnn/
  eecnn predict --ckpt_path results/agent.ckpt photo.png    class, confidence and exit of image files
  eecnn fit --config configs/cifar10.yaml                   train a classifier
  eecnn fit --config configs/agent.yaml --data.classifier_ckpt CKPT     train an exit agent for it

CIFAR-10 is downloaded into data/; --data.data_dir reads an image-folder copy (or its .tar.gz) instead.
"COMMAND --help" lists a command's settings."""


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the description's lines kept as written."""


class StderrProgressBar(TQDMProgressBar):
    """Lightning's progress bar, on stderr while predicting: ``eecnn predict``'s stdout is its table alone."""

    def init_predict_tqdm(self) -> Tqdm:
        with contextlib.redirect_stdout(sys.stderr):  # Lightning opens its bars on sys.stdout
            return super().init_predict_tqdm()


class HideTip(logging.Filter):
    """Lightning's advertisement for its cloud logger, which every run would print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip:" not in record.getMessage()


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# The scaffolding of jsonargparse's report on a value no type accepted; what is left is the reason.
_BOILERPLATE = re.compile(r"Does not validate against|Subtypes:|Errors:|Given value|Expected a <class 'NoneType'>"
                          r"|Problem with given class_path|Parser key ")


def one_line(message: str) -> str:
    """jsonargparse's multi-line report on a setting it refused, as one line: the flag (from the parser keys
    the report passes through, e.g. ``model`` then ``width`` is ``--model.width``) and the innermost reason."""
    flag = ".".join(re.findall(r'Parser key "([^"]+)"', message))
    lines = [re.sub(r"^- ", "", line.strip()) for line in message.splitlines()]  # list items lose their dash
    reasons = [line for line in lines if line and not _BOILERPLATE.match(line)]
    reason = "; ".join(reasons) or message.strip()
    given = re.search(r"^\s*Given value: (.+)$", message, re.MULTILINE)
    if given and "Got value" not in reason and not given[1].startswith(("Namespace(", "NestedArg(")):
        reason += f", got {given[1]}"
    if required := re.search(r"the following arguments are required: (.+)", reason):
        missing = [f"--{flag}.{name.strip()}" if flag else name.strip() for name in required[1].split(",")]
        return f"missing {', '.join(missing)}: pass {missing[0]} <value> on the command line or in the config"
    return reason if not flag or "--" in reason else f"--{flag}: {reason}"


def trainer_error(message: str) -> str:
    """A Trainer's refusal of a setting, with the backquoted setting named as its ``--trainer`` flag."""
    names = inspect.signature(L.Trainer).parameters
    return re.sub(r"`(\w+)`", lambda m: f"--trainer.{m[1]}" if m[1] in names else m[0], message)


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name value`` and ``name=value``."""
    kept = []
    for arg in argv:
        if kept and kept[-1] == name:
            kept.pop()
        elif not arg.startswith(name + "="):
            kept.append(arg)
    return kept


def checkpoint_to_resume(config: Namespace) -> tuple[Path, Any]:
    """What Lightning's ``--ckpt_path last`` means for a run started afresh: the last.ckpt of the run that the
    logger settings name (its version, or the newest version holding one), and that run's version."""
    if config.last_checkpoint.dirpath:
        return Path(config.last_checkpoint.dirpath) / "last.ckpt", None
    logger = config.trainer.logger
    if not (isinstance(logger, dict | Namespace) and logger.get("class_path", "").endswith("TensorBoardLogger")):
        raise InputError("--ckpt_path last finds runs through the TensorBoard logger's folders: pass the "
                         "checkpoint file instead, e.g. --ckpt_path logs/<name>/version_0/checkpoints/last.ckpt")
    args = logger.get("init_args") or {}
    folder = Path(args.get("save_dir") or "logs") / (args.get("name") or "lightning_logs")
    version = args.get("version")
    if version is None:
        found = [int(m[1]) for run in folder.glob("version_*/checkpoints/last.ckpt")
                 if (m := re.fullmatch(r"version_(\d+)", run.parents[1].name))]
        if not found:
            raise InputError(f"--ckpt_path last: no {folder}/version_*/checkpoints/last.ckpt to resume: train "
                             "first, or pass a checkpoint file")
        version = max(found)
    run = folder / (f"version_{version}" if isinstance(version, int) else str(version))
    return run / "checkpoints" / "last.ckpt", version


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


# Settings of earlier releases, and where they are now.
MOVED = {"--model.data_dir": "--data.data_dir", "--model.classifier_ckpt": "--data.classifier_ckpt",
         "--model.val_views": "--data.val_views", "--model.cache_dir": "--data.cache_dir",
         "--model.steps_per_epoch": "--trainer.limit_train_batches"}


class EarlyExitCLI(LightningCLI):
    """LightningCLI with eecnn's defaults: TensorBoard under ``logs/``, best and last checkpoints, step LR
    logging, and the model and data settings read from ``--ckpt_path`` so a checkpoint is enough to test it."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            L.LightningModule,
            None,  # any LightningDataModule
            subclass_mode_model=True,
            seed_everything_default=0,  # Lightning's True draws no seed, warns, and seeds 0 anyway
            # main() prints one line instead of a usage dump
            parser_kwargs={"exit_on_error": False, "description": DESCRIPTION, "formatter_class": HelpFormatter},
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # the models configure their own optimisers
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best epoch by the monitored metric
        # Every epoch's end as last.ckpt, to resume from: Lightning's save_last only saves when the best one does.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({
            "model": {"class_path": _class_path(EarlyExitClassifier)},
            "data": {"class_path": _class_path(CIFAR10DataModule)},
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "last_checkpoint.filename": "last",
            "last_checkpoint.enable_version_counter": False,
            "checkpoint.filename": "epoch{epoch:03d}-val_acc{val/acc:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "lr_monitor.logging_interval": "step",
            "trainer.precision": default_precision(),
            "trainer.benchmark": True,  # cuDNN picks the fastest convolution for each input shape (CUDA only)
            "trainer.logger": {
                "class_path": _class_path(TensorBoardLogger),
                "init_args": {"save_dir": "logs", "name": "eecnn"},
            },
        })

    # Private: add_arguments_to_parser is not told which subcommand's parser it fills, and only predict takes files.
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument("inputs", nargs="*", default=[],
                                help="image files, folders or glob patterns to predict with an exit agent checkpoint")
            parser.add_argument("--output", default=None, help="also save the predictions as .jsonl or .csv")
        return parser

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:
            raise InputError(trainer_error(str(err))) from None
        except ValueError as err:  # a model or datamodule refusing its arguments, wrapped by jsonargparse
            raise InputError(err if isinstance(err, InputError) else one_line(str(err))) from None
        if isinstance(self.model, ExitAgent) and self.subcommand == "test":
            self.trainer.callbacks.append(EarlyExitReport())
        if self.subcommand == "predict":
            self._predict_files()

    def _predict_files(self) -> None:
        """``eecnn predict`` of an agent reads the image files given; a classifier predicts its test split."""
        config = self.config.predict
        if not isinstance(self.model, ExitAgent):
            if config.inputs:
                raise InputError("predicting image files needs an exit agent: pass --ckpt_path <agent.ckpt> "
                                 "(a classifier checkpoint predicts its datamodule's test split, with no files)")
            return
        if not config.inputs:
            raise InputError("eecnn predict with an exit agent needs image files, folders or globs: "
                             "eecnn predict --ckpt_path <agent.ckpt> image.png images/")
        self.trainer.callbacks = [StderrProgressBar(c.refresh_rate, c.process_position)
                                  if type(c) is TQDMProgressBar else c for c in self.trainer.callbacks]
        self.trainer.callbacks.append(PredictionTable(config.output))
        cache = self.datamodule  # the agent's classifier, whose CNN the engine runs with the agent as its policy
        self.model.build(cache.num_exits, cache.num_classes)
        self.model = EarlyExitPredictor(cache.classifier, self.model, cache.classes)
        self.datamodule = ImageFilesDataModule(config.inputs)

    def after_predict(self) -> None:
        if isinstance(self.datamodule, ImageFilesDataModule) and self.datamodule.errors:
            sys.exit(1)  # each failure already has its line; the readable images were predicted

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        subcommand = argv[0] if argv and argv[0] in self.subcommands() else None
        for old, new in MOVED.items():
            if (value := _option(argv, old)) is not None:
                raise InputError(f"{old} is not a setting: pass {new} {value}")
        ckpt_path = _option(argv, "--ckpt_path")
        if subcommand and ckpt_path in ("best", "hpc", "registry"):
            raise InputError(f"--ckpt_path {ckpt_path} only means something to a Trainer that already ran in this "
                             "process: pass a checkpoint file, or --ckpt_path last")
        if subcommand and ckpt_path == "last":  # the run to resume is named by the parsed logger settings
            ckpt_path, version = checkpoint_to_resume(parser.parse_args(args)[subcommand])
            args = _without_option(argv, "--ckpt_path") + ["--ckpt_path", str(ckpt_path)]
            if version is not None:  # continue that run's TensorBoard log, not a new version's
                args += ["--trainer.logger.init_args.version", str(version)]
        # Private: no public accessor gives the subcommand's parser, whose defaults a checkpoint's settings become.
        defaults = self._subcommand_parsers[subcommand] if subcommand else parser  # run=False has no subcommands
        if subcommand and ckpt_path:
            checkpoint = read_checkpoint(ckpt_path)
            init = model_args(checkpoint, ckpt_path)
            if "target_flops_saved" in init and _option(argv, "--model.compute_weight") is not None \
                    and _option(argv, "--model.target_flops_saved") is None:
                init["target_flops_saved"] = None  # a weight given now is the operating point, not the recorded target
            recorded = checkpoint.get("datamodule_hyper_parameters") or {}
            defaults.set_defaults({
                "model": {"class_path": checkpoint["hyper_parameters"]["_class_path"], "init_args": init},
                "data": {"class_path": recorded.get("_class_path", _class_path(CIFAR10DataModule)),
                         "init_args": data_args(checkpoint, ckpt_path)}})
        # parse_args, not super(): Lightning warns of args given beside sys.argv, which a resume rewrites
        self.config = parser.parse_args(args)
        data = (self.config[subcommand] if subcommand else self.config).data
        if data.class_path != defaults.get_defaults().data.class_path:
            # jsonargparse gives another data class the default class's settings of the same names (data_dir...)
            defaults.set_defaults({"data": {"class_path": data.class_path}})
            self.config = parser.parse_args(args)
        model = (self.config[subcommand] if subcommand else self.config).model
        if subcommand in ("test", "predict") and ckpt_path and model.class_path.endswith(ExitAgent.__name__):
            ExitAgent.check_checkpoint(checkpoint, model.init_args.target_flops_saved)  # before the cache is built

    # Private: no public hook stops LightningCLI from re-applying a checkpoint's hyper-parameters over the flags.
    def _parse_ckpt_path(self) -> None:
        """Lightning would re-apply the checkpoint's hyper-parameters over the parsed config, silently undoing
        flags such as ``--data.classifier_ckpt``; ``parse_arguments`` already made them overridable defaults."""


def main(args: list[str] | None = None) -> None:
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(HideTip())
    # torch deprecates a class that Lightning 2.6 still uses internally; nothing a user can act on
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    try:
        EarlyExitCLI(args)
        if torch.distributed.is_initialized():  # DDP's processes leave together, not while others still write
            torch.distributed.destroy_process_group()
    except argparse.ArgumentError as err:
        sys.exit(f"eecnn: error: {one_line(str(err))}")
    except InputError as err:
        sys.exit(f"eecnn: error: {err}")


if __name__ == "__main__":
    main()
