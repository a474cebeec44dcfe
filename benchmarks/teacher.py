"""How much a teacher knows: the accuracy of teacher checkpoints on the validation and test images, each alone and
as the ensemble a student distils, beside a classifier's final exit.

    python benchmarks/teacher.py logs/teacher/version_0/checkpoints/last.ckpt \\
        --data ../shared/data/cifar10-jpeg.tar.gz --reference results/classifier.ckpt \\
        --output results/recipe/teacher.json

For every checkpoint (a `configs/teacher.yaml` run, or an eecnn classifier's final exit) and, with several, their
ensemble: the accuracy of its plain prediction and of the one a student is taught (``teacher_log_probs``: the
softmax averaged over the image and its mirror image, and over the teachers). The validation images are the
classifier's (``--data.val_size`` 5,000 at ``--data.split_seed`` 0 by default), which no teacher trains on.
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from early_exit.data import CIFAR10DataModule, normalize
from early_exit.errors import InputError
from early_exit.files import write_json
from early_exit.teacher import load_teacher, teacher_log_probs


@torch.no_grad()
def accuracy(networks: list[nn.Module], images: torch.Tensor, labels: torch.Tensor, plain: bool) -> float:
    """Accuracy (%) of the teacher ``networks``: one network's logits if ``plain``, else what a student is
    taught."""
    if plain:
        [network] = networks
        predictions = torch.cat([network(batch.contiguous(memory_format=torch.channels_last)).argmax(-1)
                                 for batch in images.split(500)])
    else:
        predictions = teacher_log_probs(networks, images).argmax(-1)
    return 100 * (predictions == labels).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teachers", nargs="+", help="teacher checkpoints")
    parser.add_argument("--data", required=True, help="a CIFAR-10 folder or archive")
    parser.add_argument("--reference", help="a classifier checkpoint whose final exit the teachers are set beside")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    try:
        data = CIFAR10DataModule(args.data, download=False, val_size=args.val_size, split_seed=args.split_seed)
        data.prepare_data()
        data.setup("validate")
        data.setup("test")
        networks = {path: load_teacher(path, option="a checkpoint argument")
                    for path in args.teachers + ([args.reference] if args.reference else [])}
        members = {path: [network] for path, network in networks.items()}
        if len(args.teachers) > 1:
            members["ensemble of " + ", ".join(args.teachers)] = [networks[path] for path in args.teachers]
        figures: dict[str, dict] = {}
        for split in ("val", "test"):
            images, labels = data.datasets[split].tensors
            images = normalize(images)
            figures[split] = {name: {"plain": accuracy(team, images, labels, True) if len(team) == 1 else None,
                                     "taught": accuracy(team, images, labels, False)}
                              for name, team in members.items()}
    except InputError as err:
        sys.exit(f"teacher: error: {err}")
    for split, rows in figures.items():
        for name, row in rows.items():
            plain = "" if row["plain"] is None else f"{row['plain']:.2f} % plain, "
            print(f"{split}: {name}: {plain}{row['taught']:.2f} % as taught (mirror-averaged)")
    if args.output:
        write_json(args.output, {"data": args.data, "val_size": args.val_size, "split_seed": args.split_seed,
                                 "reference": args.reference, **figures})


if __name__ == "__main__":
    main()
