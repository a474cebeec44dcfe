"""Reading eecnn checkpoints (one load, validated, with the saved model and data settings), and exporting
slim copies to ship."""

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from early_exit.curves import ship_curves
from early_exit.errors import InputError
from early_exit.files import write_atomic

PACKAGE = "early_exit."


def read_checkpoint(path: str | Path, option: str = "--ckpt_path") -> dict[str, Any]:
    """Load an eecnn checkpoint on the CPU, or raise InputError saying why it is not one (and which
    command-line ``option`` to fix)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist: check {option}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises anything from KeyError to UnpicklingError here
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}): check {option}") \
            from None
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path", "") if isinstance(checkpoint, dict) else ""
    if not class_path.startswith(PACKAGE) or "state_dict" not in checkpoint:
        raise InputError(f"{path} is not an eecnn checkpoint: pass one written by `eecnn fit` to {option}")
    return checkpoint


def init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """A class's saved hyper-parameters without the CLI's bookkeeping keys."""
    return {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}


def model_args(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The model's saved hyper-parameters. An exit agent from an earlier eecnn (whose Q-network reads another
    state, or which loaded its own classifier and data) is an InputError that says to retrain it."""
    args = init_args(checkpoint["hyper_parameters"])
    if checkpoint["hyper_parameters"]["_class_path"].endswith(".ExitAgent") and (
            "compute_weight_range" not in args or "classifier_ckpt" in args):
        raise InputError(f"{path} is an exit agent from an earlier eecnn, which this one cannot load: retrain it "
                         "with `eecnn fit --config configs/agent.yaml --data.classifier_ckpt ...`")
    return args


MACHINE_KEYS = ("data_dir", "download")  # where the data was on the machine that trained, and how it got there
RETIRED_KEYS = ("num_workers",)  # data settings earlier releases recorded: how batches were loaded, not which


def data_args(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The datamodule settings a checkpoint (at ``path``) recorded, less a data path that does not exist here (a
    checkpoint from another machine, or a relative path read from another folder): the DataModule's default
    then reads torchvision's CIFAR-10, downloading it if needed, unless ``--data.data_dir`` says otherwise. A
    recorded ``classifier_ckpt`` that is not where it was at training time is taken from beside ``path``: a
    shipped agent and its classifier move together."""
    args = {k: v for k, v in init_args(checkpoint.get("datamodule_hyper_parameters") or {}).items()
            if k not in RETIRED_KEYS}
    if args.get("data_dir") is not None and not Path(args["data_dir"]).expanduser().exists():
        for key in MACHINE_KEYS:
            args.pop(key, None)
    recorded = args.get("classifier_ckpt")
    if recorded and not Path(recorded).exists() and (Path(path).parent / Path(recorded).name).is_file():
        args["classifier_ckpt"] = str(Path(path).parent / Path(recorded).name)
    return args


SHIPPED_KEYS = ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "pytorch-lightning_version",
                "exit_sizes")  # an exit agent's: what its Q-network is built for


def export_checkpoint(source: str | Path, target: str | Path, half: bool = False) -> Path:
    """A slim copy of an eecnn checkpoint for shipping: the weights (floating-point ones in fp16 with
    ``half``), the model and data settings and the datamodule's state (class names), without the
    optimiser, loop and callback state that only resuming training needs, nor the data path of the
    machine that trained it. Written atomically; a classifier's training curves go beside it
    (``<target>-curves.csv``), for the report's plot."""
    checkpoint = read_checkpoint(source)
    slim = {key: checkpoint[key] for key in SHIPPED_KEYS if key in checkpoint}
    slim |= {key: value for key, value in checkpoint.items() if key.endswith("DataModule")}  # datamodule states
    if "datamodule_hyper_parameters" in slim:  # a user's machine has its own data: it passes --data.data_dir
        slim["datamodule_hyper_parameters"] = {key: value for key, value in slim["datamodule_hyper_parameters"].items()
                                               if key not in MACHINE_KEYS}
    if half:
        slim["state_dict"] = {name: t.half() if t.is_floating_point() else t for name, t in slim["state_dict"].items()}
    target = Path(target)
    write_atomic(target, lambda file: torch.save(slim, file))
    ship_curves(source, target)
    return target


def main(argv: list[str] | None = None) -> None:
    """``eecnn-export SOURCE TARGET [--half]``: ship a checkpoint that `eecnn test` and `eecnn predict` load."""
    parser = argparse.ArgumentParser(prog="eecnn-export", description=export_checkpoint.__doc__)
    parser.add_argument("source", help="a checkpoint written by `eecnn fit`")
    parser.add_argument("target", help="where to write the slim copy")
    parser.add_argument("--half", action="store_true", help="store floating-point weights in fp16")
    args = parser.parse_args(argv)
    try:
        target = export_checkpoint(args.source, args.target, args.half)
    except InputError as err:
        sys.exit(f"eecnn-export: error: {err}")
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")
