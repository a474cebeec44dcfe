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
    except Exception as err:  # torch.load raises anything from KeyError to UnpicklingError on a non-checkpoint
        raise InputError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}): check {option}") from None
    class_path = checkpoint.get("hyper_parameters", {}).get("_class_path", "") if isinstance(checkpoint, dict) else ""
    if not class_path.startswith(PACKAGE) or "state_dict" not in checkpoint:
        raise InputError(f"{path} is not an eecnn checkpoint: pass one written by `eecnn fit` to {option}")
    return checkpoint


def init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """A class's saved hyper-parameters without the CLI's bookkeeping keys."""
    return {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}
