"""The shipped checkpoints in results/ work from a fresh clone, and the README and docs quote the results files."""

import inspect
import json
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image

from early_exit import CIFAR10DataModule, EarlyExitPredictor
from early_exit.checkpoint import RETIRED_KEYS
from early_exit.classifier import EarlyExitClassifier
from early_exit.cli import main
from early_exit.data import CIFAR10_CLASSES, normalize
from early_exit.engine import EarlyExitResult
from early_exit.export import main as export

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def test_shipped_classifier_is_half_precision_and_under_12_mb():
    path = RESULTS / "classifier.ckpt"
    assert path.stat().st_size <= 12 * 2**20
    weights = torch.load(path, weights_only=True)["state_dict"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}


def test_predict_with_the_shipped_agent_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the agent finds its classifier beside it, not through the recorded path
    pixels = np.random.default_rng(0).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    main(["predict", "--ckpt_path", str(RESULTS / "agent.ckpt"), "photo.png", "--output", "out.jsonl",
          "--trainer.enable_progress_bar", "false"])
    [row] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["file"] == "photo.png" and row["class"] in CIFAR10_CLASSES and 1 <= row["exit"] <= 4


def test_the_shipped_pair_tests_and_predicts_from_another_folder_on_any_image_folder(tmp_path, monkeypatch, capsys):
    from conftest import make_image_folder

    monkeypatch.chdir(tmp_path)  # outside the repository: no ../shared, no results/ here
    make_image_folder(tmp_path / "tiny", train_per_class=4, test_per_class=2, classes=list(CIFAR10_CLASSES))
    data = ["--data.data_dir", "tiny", "--data.val_size", "10", "--trainer.enable_progress_bar", "false"]
    main(["test", "--ckpt_path", str(RESULTS / "classifier.ckpt"), *data])
    assert "test/acc_exit4" in capsys.readouterr().out
    main(["test", "--ckpt_path", str(RESULTS / "agent.ckpt"), *data])
    report = json.loads((tmp_path / "logs" / "eecnn" / "version_1" / "report.json").read_text())
    assert list(report["per_class_accuracy"]) == list(CIFAR10_CLASSES) and len(report["per_exit_accuracy"]) == 4
    main(["predict", "--ckpt_path", str(RESULTS / "agent.ckpt"), "tiny/test", "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "tiny/test/truck/0001.jpg" in out and re.search(r"^all class folders +20 ", out, re.MULTILINE)


def test_the_shipped_classifiers_recipe_is_the_default_config_with_its_30_epoch_cutout_and_distillation_changes(capsys):
    configs = ROOT / "configs"
    with pytest.raises(SystemExit, match="0"):  # LightningCLI exits 0 after --print_config
        main(["fit", "--config", str(configs / "cifar10.yaml"), "--config", str(configs / "cifar10-30ep-cutout.yaml"),
              "--config", str(configs / "distill.yaml"), "--print_config"])
    ours = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load((RESULTS / "classifier-config.yaml").read_text())
    assert ours["model"]["class_path"] == shipped["model"]["class_path"]
    ours_args, shipped_args = ours["model"]["init_args"], shipped["model"]["init_args"]
    defaults = inspect.signature(EarlyExitClassifier).parameters  # options added since: their defaults are the run's
    assert all(ours_args[k] == defaults[k].default for k in set(ours_args) - set(shipped_args))
    assert {k: ours_args[k] for k in shipped_args} == shipped_args
    assert ours["trainer"]["max_epochs"] == shipped["trainer"]["max_epochs"] == 30
    ours_data = {k: v for k, v in ours["data"]["init_args"].items() if k != "data_dir"}
    shipped_data = {k: v for k, v in shipped["data"]["init_args"].items() if k not in ("data_dir", *RETIRED_KEYS)}
    defaults = inspect.signature(CIFAR10DataModule).parameters
    assert all(ours_data[k] == defaults[k].default for k in set(ours_data) - set(shipped_data))
    assert {k: ours_data[k] for k in shipped_data} == shipped_data


def numbers_in(path: Path) -> set[float]:
    """Every number a results file holds: a JSON file's values (shares also as %), a text file's figures."""
    if path.suffix == ".png":
        return set()
    if path.suffix != ".json":
        return {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", path.read_text())}
    found, todo = set(), [json.loads(path.read_text())]
    while todo:
        value = todo.pop()
        if isinstance(value, dict | list):
            todo.extend(value.values() if isinstance(value, dict) else value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found |= {float(value), 100.0 * value}
    return found


def test_every_figure_in_the_readme_is_in_a_results_file_its_paragraph_links():
    text = re.sub(r"```.*?```", "", (ROOT / "README.md").read_text(), flags=re.DOTALL)  # commands, not figures
    blocks = [b for b in re.split(r"\n\s*\n|\n(?=\|)", text) if "](results/" in b]  # paragraphs and table rows
    assert len(blocks) >= 6  # the results table's rows and the limits
    for block in blocks:
        linked = [ROOT / link for link in re.findall(r"\]\((results/[^)#]+)", block)]
        assert all(path.is_file() for path in linked), block
        known = set().union(*(numbers_in(path) for path in linked))
        prose = re.sub(r"`[^`]*`", "", block).replace("\u2212", "-")  # inline code holds flags, not figures
        for figure in re.findall(r"[-+]?\d+\.\d+", prose):
            places = len(figure.split(".")[1])
            assert any(round(n, places) == float(figure) for n in known), f"{figure} not in {linked}: {block}"


def test_every_link_in_the_readme_and_docs_reaches_a_file_and_heading_of_the_repository():
    def headings(page: Path) -> set[str]:  # GitHub's anchors: lower case, punctuation dropped, spaces to hyphens
        return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.*)$", page.read_text(), re.MULTILINE)}

    pages = [ROOT / "README.md", RESULTS / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if link.startswith("https://"):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            assert target.is_relative_to(ROOT) and target.exists(), f"{page.name}: {link}"
            assert not anchor or anchor in headings(target), f"{page.name}: {link}"


def test_docs_quote_each_exit_trained_alone():
    exits = json.loads((RESULTS / "recipe" / "exits-alone.json").read_text())["exits"]
    table = re.search(r"<!-- exits-alone-table -->(.*?)<!-- /exits-alone-table -->",
                      (ROOT / "docs" / "recipe.md").read_text(), re.DOTALL).group(1)
    rows = [line for line in table.splitlines() if re.match(r"\| \d \|", line)]
    assert [row.split(" | ")[:3] for row in rows] == \
        [[f"| {e['exit']}", f"{e['shared']:.2f} %", f"{e['alone']:.2f} %"] for e in exits]


def test_docs_ablation_table_quotes_every_run_of_the_ablation_file_in_order():
    runs = json.loads((RESULTS / "recipe" / "ablation.json").read_text())
    table = re.search(r"<!-- ablation-table -->(.*?)<!-- /ablation-table -->",
                      (ROOT / "docs" / "recipe.md").read_text(), re.DOTALL).group(1)
    rows = [[cell.strip(" *()") for cell in line.split(" | ")] for line in table.splitlines()
            if re.match(r"\| \d+b?\. ", line) and "diverged" not in line]
    assert len(rows) == len(runs)
    for row, run in zip(rows, runs, strict=True):
        assert row[1:5] == [f"{a:.1f}" for a in run["test_accuracy"]], run["run"]
        assert row[6] == f"{run['thresholds']['50']['accuracy']:.2f} %", run["run"]


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"no CIFAR-10 copy at {ARCHIVE}")
def test_eecnn_test_reproduces_the_shipped_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["test", "--ckpt_path", str(RESULTS / "agent.ckpt"), "--data.data_dir", str(ARCHIVE),
          "--trainer.enable_progress_bar", "false"])
    shipped = json.loads((RESULTS / "report" / "report.json").read_text())
    fresh = json.loads((tmp_path / "logs" / "eecnn" / "version_0" / "report.json").read_text())
    for key in ("accuracy", "flops_saved_pct"):
        assert fresh[key] == pytest.approx(shipped[key], abs=0.1), key
    assert fresh["per_exit_accuracy"] == pytest.approx(shipped["per_exit_accuracy"], abs=0.1)


def test_docs_latency_table_quotes_every_row_of_the_latency_benchmark():
    rows = json.loads((RESULTS / "agent" / "latency-costs.json").read_text())["rows"]
    table = re.search(r"<!-- latency-table -->(.*?)<!-- /latency-table -->", (ROOT / "docs" / "agent.md").read_text(),
                      re.DOTALL).group(1)
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    measured = [f"{row['measured_time_saved_pct']:.1f} %" if "measured_time_saved_pct" in row else "" for row in rows]
    assert lines == [[f"{row['target']:g} %", row["policy"], f"{row['accuracy']:.2f} %",
                      f"{row['flops_saved_pct']:.1f} %", f"{row['time_saved_pct']:.1f} %", wall]
                     for row, wall in zip(rows, measured, strict=True)]


def test_docs_shift_table_quotes_every_copy_of_the_shift_benchmark():
    rows = json.loads((RESULTS / "agent" / "shift.json").read_text())["rows"]
    table = re.search(r"<!-- shift-table -->(.*?)<!-- /shift-table -->", (ROOT / "docs" / "agent.md").read_text(),
                      re.DOTALL).group(1)
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        agent, threshold, final = (row["policies"][k] for k in ("agent", "max-softmax threshold", "final exit alone"))
        assert line[:2] == [row["corruption"].replace("_", " "), str(row["severity"] or "")]
        assert line[2:] == [f"{agent['accuracy']:.2f} %", f"{agent['flops_saved_pct']:.1f} %",
                            f"{agent['wrong_early_pct']:.2f} %", f"{threshold['accuracy']:.2f} %",
                            f"{threshold['flops_saved_pct']:.1f} %", f"{threshold['wrong_early_pct']:.2f} %",
                            f"{final['accuracy']:.2f} %"]


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"no CIFAR-10 copy at {ARCHIVE}")
def test_the_shipped_pair_exported_to_onnx_answers_the_test_images_as_eecnn_predict(tmp_path):
    start = time.perf_counter()
    export(["--format", "onnx", str(RESULTS / "agent.ckpt"), str(tmp_path / "eecnn.onnx")])
    assert time.perf_counter() - start < 60
    data = CIFAR10DataModule(str(ARCHIVE), download=False)
    data.prepare_data()
    data.setup("test")
    images = data.datasets["test"].tensors[0]
    labels, _, exits, _ = ort.InferenceSession(tmp_path / "eecnn.onnx").run(None, {"images": images.numpy()})
    engine = EarlyExitPredictor.from_checkpoint(RESULTS / "agent.ckpt").engine
    expected = EarlyExitResult.cat([engine(normalize(batch)) for batch in images.split(500)])
    same = (labels == expected.prediction.numpy()) & (exits == expected.exit.numpy() + 1)
    assert same.mean() >= 0.999


def test_docs_onnx_table_quotes_the_onnx_latency_file():
    measured = json.loads((RESULTS / "benchmarks" / "onnx-latency.json").read_text())["by_threads"]
    table = re.search(r"<!-- onnx-latency-table -->(.*?)<!-- /onnx-latency-table -->",
                      (ROOT / "docs" / "benchmarks.md").read_text(), re.DOTALL).group(1)
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if re.match(r"\| (default|\d+) \|", line)]
    expected = [[threads, name, *(f"{row[key]:.3f} ms" for key in ("mean_ms", "median_ms", "p90_ms")),
                 *(f"{row.get(key, 1.0):.2f}x" for key in ("speedup_1_image", "flops_ratio", "speedup_batch"))]
                for threads, models in measured.items() for name, row in models.items()]
    assert rows == expected


def test_docs_teacher_table_quotes_the_teacher_file():
    measured = json.loads((RESULTS / "recipe" / "teacher.json").read_text())
    [teacher] = [name for name in measured["val"] if name != measured["reference"]]
    table = re.search(r"<!-- teacher-table -->(.*?)<!-- /teacher-table -->",
                      (ROOT / "docs" / "recipe.md").read_text(), re.DOTALL).group(1)
    rows = [line.strip("| ").split(" | ")[1:] for line in table.splitlines() if line.endswith("% |")]
    expected = [[f"{measured[split][name][kind]:.2f} %" for split in ("val", "test")]
                for name in (teacher, measured["reference"]) for kind in ("plain", "taught")]
    assert rows == expected


def test_docs_distillation_table_quotes_both_full_size_runs():
    runs = json.loads((RESULTS / "recipe" / "distillation.json").read_text())
    table = re.search(r"<!-- distillation-table -->(.*?)<!-- /distillation-table -->",
                      (ROOT / "docs" / "recipe.md").read_text(), re.DOTALL).group(1)
    rows = [line.strip("| ").split(" | ")[1:] for line in table.strip().splitlines()[2:]]
    figures = lambda values: " / ".join(f"{value:.1f}" for value in values)
    rule = lambda rule: f"{rule['accuracy']:.2f} % at {rule['flops_saved_pct']:.1f} %"
    assert rows == [[figures(run["test_accuracy"]), figures(run["test_ece"]),
                     *(rule(run["thresholds"][saved]) for saved in ("40", "50", "60"))] for run in runs]
