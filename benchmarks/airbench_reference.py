"""How far does a 94 %-class fast recipe get on the data at hand? airbench94 trained on the CPU, on our copy.

    git clone https://github.com/KellerJordan/cifar10-airbench /tmp/airbench
    git -C /tmp/airbench checkout f1c599c4af24aca803e3e65a6a7e52a502e09d0e
    python benchmarks/airbench_reference.py /tmp/airbench/legacy/airbench94.py \\
        --data ../shared/data/cifar10-jpeg.tar.gz --output results/airbench.json

airbench94 (Keller Jordan) reaches 94.0 % on the original CIFAR-10 test split in 9.9 epochs, with test-time
augmentation (mirror and translate, six views). Its published figures, and the bars set for eecnn from them,
are on the original images; this runs airbench's own code, unchanged but for the device, on any image-folder
copy of CIFAR-10 (such as the JPEG one), so the two can be compared. The port: images come from eecnn's reader
in fp32 rather than from torchvision in fp16, the network runs in bf16 autocast where the CPU has native bf16
(else fp32), and times come from the wall clock, not CUDA events. ``--epochs`` overrides airbench's 9.9;
accuracy is printed with and without test-time augmentation, as eecnn's exits use none.
"""

import argparse
import re
import sys
import time
import types
from pathlib import Path

import torch

from early_exit.data import extract_archive, find_split_root, read_image_folder
from early_exit.errors import InputError
from early_exit.files import write_json
from early_exit.report import describe_device

AIRBENCH_COMMIT = "f1c599c4af24aca803e3e65a6a7e52a502e09d0e"

# (airbench's text, what runs instead); each must occur in legacy/airbench94.py at AIRBENCH_COMMIT.
PORT = [
    ("torch.backends.cudnn.benchmark = True\n", ""),
    ("""        data_path = os.path.join(path, 'train.pt' if train else 'test.pt')
        if not os.path.exists(data_path):
            dset = torchvision.datasets.CIFAR10(path, download=True, train=train)
            images = torch.tensor(dset.data)
            labels = torch.tensor(dset.targets)
            torch.save({'images': images, 'labels': labels, 'classes': dset.classes}, data_path)

        data = torch.load(data_path, map_location=torch.device(gpu))
        self.images, self.labels, self.classes = data['images'], data['labels'], data['classes']
        # It's faster to load+process uint8 data than to load preprocessed fp16 data
        self.images = (self.images.half() / 255).permute(0, 3, 1, 2).to(memory_format=torch.channels_last)
""", """        images, self.labels, self.classes = READ_SPLIT('train' if train else 'test')
        self.images = (images.float() / 255).to(memory_format=torch.channels_last)
"""),
    ("    net = net.half().cuda()\n", ""),
    ("""    for mod in net.modules():
        if isinstance(mod, BatchNorm):
            mod.float()
""", ""),
    ("        return net(inputs).clone()", """        with AUTOCAST():
            return net(inputs).float()"""),
    ("        return 0.5 * net(inputs) + 0.5 * net(inputs.flip(-1))", """        with AUTOCAST():
            return (0.5 * net(inputs) + 0.5 * net(inputs.flip(-1))).float()"""),
    ("""            outputs = model(inputs)
            loss = loss_fn(outputs, labels).sum()""", """            with AUTOCAST():
                outputs = model(inputs)
            loss = loss_fn(outputs.float(), labels).sum()"""),
    ("""    starter = torch.cuda.Event(enable_timing=True)
    ender = torch.cuda.Event(enable_timing=True)
""", ""),
    ("CifarLoader('cifar10', train=False", "CifarLoader(None, train=False"),
    ("CifarLoader('cifar10', train=True", "CifarLoader(None, train=True"),
    ("""    tta_val_acc = evaluate(model, test_loader, tta_level=hyp['net']['tta_level'])""",
     """    plain_val_acc = evaluate(model, test_loader, tta_level=0)
    tta_val_acc = evaluate(model, test_loader, tta_level=hyp['net']['tta_level'])"""),
    ("    return tta_val_acc\n", "    return plain_val_acc, tta_val_acc, total_time_seconds\n"),
]
TIMERS = [  # every CUDA-event timing in airbench becomes a wall-clock one, at any indentation
    (r"starter\.record\(\)", "start = time.perf_counter()"),
    (r"( *)ender\.record\(\)\n\1torch\.cuda\.synchronize\(\)\n"
     r"\1total_time_seconds \+= 1e-3 \* starter\.elapsed_time\(ender\)",
     r"\1total_time_seconds += time.perf_counter() - start"),
]


def load_airbench(source: Path, read_split, bf16: bool) -> types.ModuleType:
    """airbench94's module, ported to the CPU and to ``read_split(split) -> (images, labels, classes)``."""
    text = source.read_text()
    for old, new in PORT:
        if old not in text:
            raise InputError(f"{source} is not airbench's legacy/airbench94.py at commit {AIRBENCH_COMMIT[:8]}: "
                             f"check out that commit")
        text = text.replace(old, new, 1)
    for pattern, replacement in TIMERS:
        text = re.sub(pattern, replacement, text)
    if "cuda" in text:
        raise InputError(f"{source} still uses CUDA after the port: it is not airbench94.py at {AIRBENCH_COMMIT[:8]}")
    module = types.ModuleType("airbench94")
    module.READ_SPLIT = read_split
    module.AUTOCAST = lambda: torch.autocast("cpu", torch.bfloat16, enabled=bf16)
    module.time = time
    exec(compile(text, str(source), "exec"), module.__dict__)  # noqa: S102 - airbench's code, pinned above
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("airbench", type=Path,
                        help=f"legacy/airbench94.py of cifar10-airbench at commit {AIRBENCH_COMMIT[:8]}")
    parser.add_argument("--data", required=True, type=Path,
                        help="a CIFAR-10 image folder (train/<class>/*, test/<class>/*) or its .tar.gz")
    parser.add_argument("--epochs", type=float, default=9.9, help="training epochs (airbench's own: 9.9)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    try:
        if not args.airbench.is_file():
            raise InputError(f"no file {args.airbench}: clone cifar10-airbench and pass its legacy/airbench94.py")
        if not args.data.exists():
            raise InputError(f"--data {args.data} does not exist")
        root = find_split_root(extract_archive(args.data) if args.data.is_file() else args.data)
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        airbench = load_airbench(args.airbench, lambda split: read_image_folder(root, split), bf16)
    except InputError as error:
        sys.exit(f"error: {error}")
    airbench.hyp["opt"]["train_epochs"] = args.epochs
    airbench.print_columns(airbench.logging_columns_list, is_head=True)
    runs = []
    for run in range(args.runs):
        plain, tta, seconds = airbench.main(run)
        runs.append({"test_accuracy": 100 * plain, "test_accuracy_tta": 100 * tta, "seconds": seconds})
        print(f"run {run}: {100 * plain:.2f} % on test without test-time augmentation, {100 * tta:.2f} % with it, "
              f"{seconds / 60:.1f} min")
    figures = {
        "airbench": f"legacy/airbench94.py at {AIRBENCH_COMMIT}",
        "data": str(args.data),
        "epochs": args.epochs,
        "precision": "bf16 autocast" if bf16 else "fp32",
        "device": describe_device(torch.device("cpu")),
        "runs": runs,
    }
    if args.output:
        write_json(args.output, figures)


if __name__ == "__main__":
    main()
