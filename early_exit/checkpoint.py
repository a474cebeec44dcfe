"""Reading eecnn checkpoints: one load, validated, with the saved model and data settings."""

from pathlib import Path
from typing import Any

import torch

from early_exit.errors import InputError

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
TEACHER_KEYS = ("teacher_ckpts", "teacher_cache_dir")  # what taught the classifier: training only, on its machine


def data_args(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The datamodule settings a checkpoint (at ``path``) recorded, less a data path that does not exist here (a
    checkpoint from another machine, or a relative path read from another folder): the DataModule's default
    then reads torchvision's CIFAR-10, downloading it if needed, unless ``--data.data_dir`` says otherwise. A
    recorded ``classifier_ckpt`` that is not where it was at training time is taken from beside ``path``: a
    shipped agent and its classifier move together. Distillation teachers are left out: reading a trained
    classifier's images never needs its teachers' predictions."""
    args = {k: v for k, v in init_args(checkpoint.get("datamodule_hyper_parameters") or {}).items()
            if k not in RETIRED_KEYS + TEACHER_KEYS}
    if args.get("data_dir") is not None and not Path(args["data_dir"]).expanduser().exists():
        for key in MACHINE_KEYS:
            args.pop(key, None)
    recorded = args.get("classifier_ckpt")
    beside = Path(path).parent / Path(recorded or "").name
    if recorded and not Path(recorded).exists() and beside.is_file() and not beside.samefile(path):
        args["classifier_ckpt"] = str(beside)  # not the agent itself, when both are called last.ckpt
    return args
