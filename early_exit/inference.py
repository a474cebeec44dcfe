"""Using a trained classifier and exit agent: predicting images and evaluating data, from Python or ``eecnn predict``.

    predictor = EarlyExitPredictor.from_checkpoint("results/agent.ckpt")
    predictor.predict("cat.png")        # [{"class": "cat", "confidence": 0.93, "exit": 2, "flops": ...}]
    report = predictor.evaluate(loader)  # the same dict as report.json

Every prediction runs through the early-exit engine, in batches: an image stops computing at its exit.
"""

import csv
import io
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor

from early_exit.agent import ExitAgent
from early_exit.cache import load_classifier, run_exits
from early_exit.checkpoint import data_args, model_args, read_checkpoint
from early_exit.classifier import EarlyExitClassifier
from early_exit.data import IMAGE_SIZE, normalize, read_image_files, rgb_array
from early_exit.engine import EarlyExitEngine, EarlyExitResult
from early_exit.errors import InputError
from early_exit.evaluation import baselines
from early_exit.files import write_text
from early_exit.report import evaluate_engine, policy_report

OUTPUT_FORMATS = (".jsonl", ".csv")


def prediction_rows(result: EarlyExitResult, classes: list[str], files: list[Path] | None = None) -> list[dict]:
    """One dict per image: its file (if any), class name, confidence, exit taken (1-based) and FLOPs spent."""
    rows = [{"class": classes[p], "confidence": c, "exit": e + 1, "flops": f}
            for p, c, e, f in zip(result.prediction.tolist(), result.confidence.tolist(), result.exit.tolist(),
                                  result.flops.tolist())]
    if files is not None:
        rows = [{"file": str(file), **row} for file, row in zip(files, rows)]
    return rows


def aligned(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(*lines)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def format_table(rows: list[dict]) -> str:
    header = ("file", "class", "confidence", "exit", "MFLOPs")
    return aligned([header] + [(row.get("file", str(i)), row["class"], f"{row['confidence']:.3f}", str(row["exit"]),
                                f"{row['flops'] / 1e6:.1f}") for i, row in enumerate(rows)])


def folder_summary(rows: list[dict], classes: list[str]) -> str:
    """Per folder of predicted files: how many, their mean exit and, where the folder is named after a class
    (the layout of every labelled image set, ``test/<class>/*``), the share predicted as that class."""
    folders: dict[str, list[dict]] = {}
    for row in rows:
        folders.setdefault(str(Path(row["file"]).parent), []).append(row)
    lines = [("folder", "images", "mean exit", "accuracy")]
    labelled = right_in_labelled = 0
    for folder, group in folders.items():
        right = sum(row["class"] == Path(folder).name for row in group)
        known = Path(folder).name in classes
        if known:
            labelled, right_in_labelled = labelled + len(group), right_in_labelled + right
        lines.append((folder, str(len(group)), f"{sum(row['exit'] for row in group) / len(group):.2f}",
                      f"{100 * right / len(group):.2f} %" if known else "-"))
    if labelled and len(folders) > 1:
        lines.append(("all class folders", str(labelled), "", f"{100 * right_in_labelled / labelled:.2f} %"))
    return aligned(lines)


def check_output_path(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix not in OUTPUT_FORMATS:
        raise InputError(f"--output {output} must end in {' or '.join(OUTPUT_FORMATS)} (JSON lines or CSV)")
    if not output.parent.is_dir():
        raise InputError(f"--output {output}: folder {output.parent} does not exist")
    return output


def write_predictions(rows: list[dict], output: Path) -> None:
    """JSON lines or CSV by ``output``'s suffix, written atomically."""
    if output.suffix == ".jsonl":
        write_text(output, "".join(json.dumps(row) + "\n" for row in rows))
        return
    text = io.StringIO()
    fields = list(rows[0]) if rows else ["file", "class", "confidence", "exit", "flops"]
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(output, text.getvalue())


class PredictionTable(BasePredictionWriter):
    """Prints ``eecnn predict``'s per-image results as a table, then a summary per folder, and with ``output``
    saves them. The table is printed once predicting ends, after the progress bar has closed its line."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = check_output_path(output) if output else None
        self.rows: list[dict] = []

    def write_on_epoch_end(self, trainer: L.Trainer, module: "EarlyExitPredictor", predictions: list[dict],
                           batch_indices: list) -> None:
        if not predictions:
            return
        local = {name: torch.cat([p[name] for p in predictions]) for name in predictions[0]}
        if trainer.world_size > 1:  # every rank predicted a shard: the first rank writes them all
            local = self.gather(module, local)
            if not trainer.is_global_zero:
                return
        index, order = local.pop("index").sort(stable=True)
        kept = index >= 0  # not a gathering's padding
        kept[1:] &= index[1:] != index[:-1]  # nor an image a shard repeats
        result = EarlyExitResult(**{name: values[order][kept] for name, values in local.items()})
        files = [trainer.datamodule.files[i] for i in index[kept].tolist()]
        self.rows = prediction_rows(result, module.classes, files)
        if self.output is not None:
            write_predictions(self.rows, self.output)
            print(f"wrote {len(self.rows)} predictions to {self.output}", file=sys.stderr)

    @staticmethod
    def gather(module: L.LightningModule, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank's predictions, on every rank: shards may differ in length, so each is padded to the
        longest with index -1 first."""
        longest = int(module.all_gather(torch.tensor(len(local["index"]), device=module.device)).max())
        padded = {name: torch.cat([values, values.new_full((longest - len(values),), -1)])
                  for name, values in local.items()}
        return {name: module.all_gather(values).flatten(0, 1).cpu() for name, values in padded.items()}

    def on_predict_end(self, trainer: L.Trainer, module: "EarlyExitPredictor") -> None:
        if self.rows:
            print(format_table(self.rows))
            print(folder_summary(self.rows, module.classes))


class EarlyExitPredictor(L.LightningModule):
    """A classifier's CNN and an exit policy, composed into the early-exit engine: predicts images and evaluates
    data from Python, and is the module `eecnn predict` runs (its ``predict_step`` takes normalised images
    and their indices). Loading an agent checkpoint into it (``--ckpt_path``) loads the policy; the CNN keeps
    its weights. ``evaluate`` computes every exit's outputs with the ``classifier``, as the exit cache does."""

    def __init__(self, classifier: EarlyExitClassifier, policy: ExitAgent, classes: list[str],
                 batch_size: int = 256) -> None:
        super().__init__()
        self.classifier, self.policy, self.classes, self.batch_size = classifier, policy, classes, batch_size
        self._engine: EarlyExitEngine | None = None

    @property
    def engine(self) -> EarlyExitEngine:
        """The classifier's CNN run with the policy's greedy decisions at its operating point: composed when
        first used, once the policy's weights are loaded (a plain object: its folded CNN copy is not saved)."""
        if self._engine is None:
            self._engine = EarlyExitEngine(self.classifier.model, self.policy.greedy_policy()).to(self.device)
        return self._engine

    @classmethod
    def from_checkpoint(cls, agent_ckpt: str | Path, classifier_ckpt: str | Path | None = None,
                        device: str = "cpu", batch_size: int = 256, compute_weight: float | None = None,
                        target_flops_saved: float | None = None) -> "EarlyExitPredictor":
        """Load an agent and the classifier it was trained for: ``classifier_ckpt``, else the path the agent
        recorded, else the file of that name beside the agent. The agent answers at the operating point it
        recorded, or at ``compute_weight`` or ``target_flops_saved`` (as ``--model.*`` of `eecnn test`)."""
        checkpoint = read_checkpoint(agent_ckpt)
        settings = model_args(checkpoint, agent_ckpt)
        if compute_weight is not None or target_flops_saved is not None:
            settings |= {"compute_weight": settings["compute_weight"] if compute_weight is None else compute_weight,
                         "target_flops_saved": target_flops_saved}
        agent = ExitAgent(**settings)
        agent.on_load_checkpoint(checkpoint)
        agent.load_state_dict(checkpoint["state_dict"])
        path = classifier_ckpt or data_args(checkpoint, agent_ckpt)["classifier_ckpt"]
        classifier, _, classes = load_classifier(path, option="classifier_ckpt")
        agent.build(classifier.model.num_exits, classifier.hparams.num_classes)
        return cls(classifier, agent, classes, batch_size).to(device).eval()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """An agent's checkpoint holds the policy's weights; the CNN's are its classifier's, already loaded."""
        self.policy.on_load_checkpoint(checkpoint)
        own = {f"classifier.{name}": value for name, value in self.classifier.state_dict().items()}
        checkpoint["state_dict"] = own | {f"policy.{name}": value for name, value in checkpoint["state_dict"].items()}

    def on_predict_start(self) -> None:
        self._engine = None  # composed anew, from the weights just loaded and on the device predicting

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, index = batch
        return {"index": index, **vars(self.engine(images))}

    def as_batch(self, images) -> tuple[Tensor, list[Path] | None]:
        """uint8 or [0, 1] float (N, 3, 32, 32) images from a tensor, a PIL image, a path, or a list of them."""
        if isinstance(images, Tensor):
            batch = images[None] if images.dim() == 3 else images
            if batch.dim() != 4 or batch.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise InputError(f"image tensors must be (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) or (3, {IMAGE_SIZE}, "
                                 f"{IMAGE_SIZE}), got {tuple(images.shape)}: resize them first")
            return batch, None
        items = images if isinstance(images, list | tuple) else [images]
        if all(isinstance(item, Image.Image) for item in items):
            arrays = torch.stack([torch.from_numpy(rgb_array(item).copy()) for item in items])
            return arrays.permute(0, 3, 1, 2).contiguous(), None
        files, batch, errors = read_image_files([str(item) for item in items])
        if errors:
            raise InputError("; ".join(errors))
        return batch, files

    def predict(self, images) -> list[dict]:
        """Per image: class name, confidence, exit taken (1-based), FLOPs spent, and the file for paths."""
        batch, files = self.as_batch(images)
        if not len(batch):
            raise InputError("no images to predict")
        result = EarlyExitResult.cat([self.engine(normalize(chunk)) for chunk in batch.split(self.batch_size)])
        return prediction_rows(result, self.classes, files)

    def evaluate(self, loader, val_loader=None) -> dict:
        """The report (the dict ``eecnn test`` writes to report.json) on a loader of (images, labels) batches;
        threshold baselines are tuned on ``val_loader`` if one is given (and the FLOPs the policy saves there
        reported), else only fixed exits and the oracle."""
        images, labels = self._collect(loader)
        outputs = run_exits(self.classifier, images, labels)
        if val_loader is not None:
            val = run_exits(self.classifier, *self._collect(val_loader))
            return policy_report(self.engine, images, val, outputs, self.classes, self.batch_size)
        others = baselines(outputs, outputs, self.engine.costs, self.engine.full_flops, targets=())
        return evaluate_engine(self.engine, images, outputs, self.classes, others, self.batch_size)[1]

    @staticmethod
    def _collect(loader) -> tuple[Tensor, Tensor]:
        images, labels = zip(*((batch[0], batch[1]) for batch in loader))
        return torch.cat(images), torch.cat(labels)
