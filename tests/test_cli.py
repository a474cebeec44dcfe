import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_image_folder
from helpers import error_of, scalars, tiny_fit_args

from early_exit.cli import main
from early_exit.curves import read_scalars
from early_exit.data import CIFAR10DataModule

ROOT = Path(__file__).resolve().parents[1]
AGENT_CONFIG = str(ROOT / "configs" / "agent.yaml")
EECNN = str(Path(sys.executable).parent / "eecnn")  # the installed console script


def run(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit as exit:  # LightningCLI exits 0 after --print_config
        if exit.code not in (0, None):
            raise


def test_help_lists_the_subcommands(capsys):
    run(["--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("fit", "validate", "test", "predict"))


def test_printed_config_is_accepted_unchanged(tmp_path, capsys):
    run(["fit", "--config", str(ROOT / "configs" / "cifar10.yaml"), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    run(["fit", "--config", str(printed), "--print_config"])
    assert capsys.readouterr().out == printed.read_text()
    assert yaml.safe_load(printed.read_text())["model"]["class_path"] == "early_exit.EarlyExitClassifier"


def test_fit_logs_to_tensorboard_and_keeps_best_and_last_checkpoints(trained_run):
    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2
    tags = scalars(trained_run)
    for tag in ("train/loss_step", "val/loss", "val/acc_exit1", "val/acc_exit2", "val/acc",
                "train/acc_exit1_epoch", "lr-AdamW/weights", "val/ece_exit1", "flops/exit1", "flops/exit2"):
        assert tag in tags, tag
    assert tags["flops/exit1"][0] < tags["flops/exit2"][0]


def test_checkpoint_alone_is_enough_to_test(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(["test", "--ckpt_path", str(trained_run / "checkpoints" / "last.ckpt"),
         "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "test/acc_exit1" in out and "test/acc_exit2" in out
    tags = scalars(tmp_path / "logs" / "eecnn" / "version_0")
    assert 0.5 < tags["test/acc"][0] <= 1.0  # trained on 4 separable classes: well above chance


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.ckpt", "does not exist"),
    (lambda d: (d / "junk.ckpt").write_text("hello") and d / "junk.ckpt", "not a readable PyTorch checkpoint"),
    (lambda d: torch.save({"state_dict": {}}, d / "other.ckpt") or d / "other.ckpt", "not an eecnn checkpoint"),
])
def test_bad_checkpoint_is_one_line(tmp_path, make, expected):
    assert expected in error_of(["test", "--ckpt_path", str(make(tmp_path))])


def test_bad_data_dir_is_one_line(tmp_path):
    message = error_of(["fit", *tiny_fit_args(tmp_path / "nowhere.tar.gz")])
    assert "nowhere.tar.gz does not exist" in message


@pytest.mark.parametrize("args, expected", [
    (["--trainer.max_epochs", "-3"], "--trainer.max_epochs must be a non-negative integer or -1"),
    (["--trainer.max_epochs", "many"], "--trainer.max_epochs: Expected a <class 'int'>, got many"),
    (["--data.batch_size", "0"], "--data.batch_size must be at least 1, got 0"),
    (["--data.cutout", "-8"], "--data.cutout must be at least 0, got -8"),
    (["--model.exit_weights", "[1,2,3]"], ("--model.exit_weights needs 2 non-negative weights with a positive sum, "
                                          "got [1.0, 2.0, 3.0]: e.g. --model.exit_weights [1,1]")),  # 2 exits
    (["--model.head", "dense"], "--model.head: Expected a typing.Literal['mlp', 'pool', 'conv']. Got value: dense"),
    (["--trainer.no_such_flag", "1"], "unrecognized arguments: --trainer.no_such_flag 1"),
])
def test_bad_settings_are_one_line_naming_the_flag(image_folder, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    assert error_of(["fit", *tiny_fit_args(image_folder), *args]).startswith(f"eecnn: error: {expected}")
    assert not (tmp_path / "logs").exists()  # refused before anything was written


def test_an_agent_without_its_classifier_says_which_flag_to_pass():
    message = error_of(["fit", "--config", str(ROOT / "configs" / "agent.yaml")])
    assert message.startswith("eecnn: error: missing --data.classifier_ckpt: pass --data.classifier_ckpt")


def agent_fit_args(trained_run: Path) -> list[str]:
    return ["fit", "--config", AGENT_CONFIG, "--data.classifier_ckpt", str(trained_run / "checkpoints" / "last.ckpt"),
            "--trainer.limit_train_batches", "20",
            "--trainer.max_epochs", "1", "--model.target_flops_saved", "null",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_an_agent_reads_its_images_through_the_data_section(trained_run, image_archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run([*agent_fit_args(trained_run), "--data.data_dir", str(image_archive)])  # the classifier read a folder
    run_dir = tmp_path / "logs" / "agent" / "version_0"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["init_args"]["data_dir"] == str(image_archive)
    fingerprint = CIFAR10DataModule(str(image_archive), val_size=32).fingerprint()
    assert {p.name.split("-")[2] for p in (tmp_path / "logs" / "exit_cache").iterdir()} == {f"data{fingerprint}"}
    run(["test", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), "--data.data_dir", str(image_archive),
         "--data.batch_size", "16", "--trainer.enable_progress_bar", "false"])
    report = json.loads((tmp_path / "logs" / "eecnn" / "version_0" / "report.json").read_text())
    assert report["throughput"]["batch_size"] == 16  # the engine reads the test images in --data.batch_size batches


@pytest.mark.parametrize("args, expected", [
    (["--data.classifier_ckpt", "missing.ckpt"],
     "checkpoint missing.ckpt does not exist: check --data.classifier_ckpt"),
    (["--data.data_dir", "nowhere.tar.gz"], "archive nowhere.tar.gz does not exist: check --data.data_dir"),
    (["--data.data_dir", "three"], "the data at three has 3 classes but the classifier 4: point --data.data_dir at"),
    (["--data.batch_size", "0"], "--data.batch_size must be at least 1, got 0"),
    (["--model.data_dir", "x"], "--model.data_dir is not a setting: pass --data.data_dir x"),
    (["--model.classifier_ckpt", "c.ckpt"],
     "--model.classifier_ckpt is not a setting: pass --data.classifier_ckpt c.ckpt"),
    (["--trainer.limit_train_batches", "1.0"], ("the exit agent trains on an endless stream of environment steps: set "
                                              "--trainer.limit_train_batches")),
    (["--model.replay_batch_size", "many"], "--model.replay_batch_size: Expected a <class 'int'>. Got value: many"),
])
def test_bad_agent_settings_are_one_line_before_the_exit_cache_is_built(trained_run, tmp_path, monkeypatch, args,
                                                                       expected):
    monkeypatch.chdir(tmp_path)
    three = make_image_folder(tmp_path / "three", train_per_class=2, test_per_class=1)
    for split in ("train", "test"):
        shutil.rmtree(three / split / "stripe")
    assert error_of([*agent_fit_args(trained_run), *args]).startswith(f"eecnn: error: {expected}")
    assert not (tmp_path / "logs" / "exit_cache").exists()


def test_a_data_path_missing_here_falls_back_to_torchvision_cifar10_in_data(trained_run, tmp_path, monkeypatch):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["data_dir"] = "/home/someone/cifar10-jpeg.tar.gz"  # another machine's
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    monkeypatch.chdir(tmp_path)
    message = error_of(["test", "--ckpt_path", "moved.ckpt", "--data.download", "false"])
    assert message == "eecnn: error: data_dir data does not exist: check --data.data_dir, or pass --data.download true"


@pytest.mark.parametrize("flags, weight, target", [([], 0.5, None), (["--model.compute_weight", "0.7"], 0.7, None),
                                                   (["--model.target_flops_saved", "55"], 0.5, 55.0)])
def test_an_agents_operating_point_is_chosen_when_it_is_tested(trained_agent, capsys, flags, weight, target):
    run(["test", "--ckpt_path", str(trained_agent), *flags, "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert (model["compute_weight"], model["target_flops_saved"]) == (weight, target)  # a weight replaces the target


def test_a_flops_target_the_agent_cannot_meet_is_refused_before_any_image_is_read(trained_agent, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = error_of(["test", "--ckpt_path", str(trained_agent), "--model.target_flops_saved", "99"])
    assert message.startswith("eecnn: error: this agent saves at most ") and "--model.target_flops_saved" in message
    assert not (tmp_path / "logs").exists()  # no exit cache built, no log folder left


def test_an_agent_whose_curve_predates_exact_targets_says_to_retrain_it(trained_agent, tmp_path, monkeypatch):
    checkpoint = torch.load(trained_agent, weights_only=True)
    checkpoint["state_dict"]["curve"] = checkpoint["state_dict"]["curve"][:21]  # as agents were saved before
    torch.save(checkpoint, tmp_path / "old.ckpt")
    monkeypatch.chdir(tmp_path)
    message = error_of(["predict", "--ckpt_path", "old.ckpt", "photo.png"])
    assert message.startswith("eecnn: error: this agent checkpoint was written by an older eecnn")
    assert "retrain" in message


def weight_not_an_input(checkpoint: dict) -> None:  # as agents were saved before the compute weight was an input
    hparams = checkpoint["hyper_parameters"]
    hparams["data_dir"], hparams["batch_size"] = None, hparams.pop("replay_batch_size")
    del hparams["compute_weight_range"], hparams["target_flops_saved"]


def classifier_in_the_model(checkpoint: dict) -> None:  # as agents were saved before the exit cache was a data module
    checkpoint["hyper_parameters"] |= {"classifier_ckpt": checkpoint["datamodule_hyper_parameters"].pop(
        "classifier_ckpt"), "num_exits": 2, "num_classes": 4, "steps_per_epoch": 40}
    del checkpoint["exit_sizes"]


@pytest.mark.parametrize("age", [weight_not_an_input, classifier_in_the_model])
@pytest.mark.parametrize("command", ["test", "predict"])
def test_an_agent_from_an_earlier_eecnn_says_to_retrain_it(trained_agent, tmp_path, monkeypatch, age, command):
    checkpoint = torch.load(trained_agent, weights_only=True)
    age(checkpoint)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    monkeypatch.chdir(tmp_path)
    message = error_of([command, "--ckpt_path", "old.ckpt", *(["photo.png"] if command == "predict" else [])])
    assert message.startswith("eecnn: error: old.ckpt is an exit agent from an earlier eecnn") and "retrain" in message


def test_ckpt_path_last_resumes_the_latest_run_in_its_own_log(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    constant = ["--model.lr_schedule", "constant"]  # a schedule that allows more epochs on resuming
    run(["fit", *tiny_fit_args(image_folder, epochs=1), *constant])
    run(["fit", *tiny_fit_args(image_folder, epochs=1), *constant])  # version_1: the latest, which `last` resumes
    run(["fit", *tiny_fit_args(image_folder, epochs=2), *constant, "--ckpt_path", "last"])
    runs = tmp_path / "logs" / "eecnn"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    last = torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 2 * 5  # 160 training images in batches of 32
    assert len(scalars(runs / "version_1")["val/acc"]) == 2  # one log across both sessions
    assert "best" in error_of(["fit", *tiny_fit_args(image_folder), "--ckpt_path", "best"])
    message = error_of(["fit", *tiny_fit_args(image_folder), "--ckpt_path", "last",
                        "--trainer.logger.init_args.name", "elsewhere"])
    assert "no logs/elsewhere/version_*/checkpoints/last.ckpt to resume" in message


def test_a_killed_fit_resumes_with_ckpt_path_last_to_the_same_end_and_one_log(image_folder, tmp_path):
    args = [EECNN, "fit", *tiny_fit_args(image_folder, epochs=20)]
    run_dir = tmp_path / "logs" / "eecnn" / "version_0"
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL  # killed mid-run, not finished
    subprocess.run(args + ["--ckpt_path", "last"], cwd=tmp_path, check=True, capture_output=True)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20 * 5  # as an uninterrupted run: 160 training images in batches of 32
    steps = read_scalars(run_dir)["val/acc"][0]
    assert sorted(set(steps)) == [5 * epoch - 1 for epoch in range(1, 21)]  # every epoch, in the one folder


def test_console_script_prints_one_line_and_fails(tmp_path):
    result = subprocess.run([EECNN, "test", "--ckpt_path", str(tmp_path / "missing.ckpt")],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode != 0
    message = f"eecnn: error: checkpoint {tmp_path / 'missing.ckpt'} does not exist: check --ckpt_path"
    assert result.stderr.strip().splitlines() == [message]


@pytest.mark.slow
def test_ddp_on_two_processes_reports_all_rank_metrics(image_folder, trained_run, tmp_path):
    """2 CPU processes (gloo) train, then test: the logged test accuracy equals the 1-process value."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    fit = subprocess.run([EECNN, "fit", *tiny_fit_args(image_folder, epochs=1), *ddp],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert (tmp_path / "logs" / "eecnn" / "version_0" / "checkpoints" / "last.ckpt").is_file()

    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    for devices in ("1", "2"):
        test = subprocess.run([EECNN, "test", "--ckpt_path", ckpt, "--trainer.devices", devices,
                               "--trainer.strategy", "ddp" if devices == "2" else "auto",
                               "--trainer.logger.name", f"devices{devices}"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
        assert test.returncode == 0, test.stderr[-2000:]
    one = scalars(tmp_path / "logs" / "devices1" / "version_0")
    two = scalars(tmp_path / "logs" / "devices2" / "version_0")
    for tag in ("test/acc_exit1", "test/acc"):
        assert one[tag] == two[tag], tag
    assert one["test/loss"][0] == pytest.approx(two["test/loss"][0], rel=1e-4)


def test_ddp_predict_on_two_processes_writes_every_image_once(trained_agent, image_folder, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    files = sorted(str(f) for f in (image_folder / "test").glob("*/*.jpg"))[:7]  # odd: one shard is padded
    predict = subprocess.run([EECNN, "predict", "--ckpt_path", str(trained_agent), *files, "--output", "out.jsonl",
                              "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                              "--trainer.enable_progress_bar", "false"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert predict.returncode == 0, predict.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["file"] for row in rows] == files  # all of them, once each, in the order given
    assert predict.stdout.count("\nfolder ") == 1  # one table, from one process


def test_flags_override_the_settings_saved_in_the_checkpoint(trained_agent, tmp_path):
    message = error_of(["test", "--ckpt_path", str(trained_agent), "--data.classifier_ckpt", str(tmp_path / "x.ckpt")])
    assert "x.ckpt does not exist" in message  # the flag, not the classifier path the agent recorded


def test_the_recipe_with_a_weight_average_ships_the_average(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(["fit", "--config", str(ROOT / "configs" / "cifar10.yaml"), *tiny_fit_args(image_folder, epochs=2),
         "--model.exit_weights", "[0.5,1]", "--trainer.callbacks+=EMAWeightAveraging",
         "--trainer.callbacks.decay", "0.9"])
    checkpoint = torch.load(tmp_path / "logs" / "classifier" / "version_0" / "checkpoints" / "last.ckpt",
                            weights_only=True)
    average, current = checkpoint["state_dict"], checkpoint["current_model_state"]  # EMAWeightAveraging's keys
    assert any(not torch.equal(average[k], current[k]) for k in average if average[k].is_floating_point())


def test_a_compiled_classifier_trains_and_its_checkpoint_loads_as_any_other(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(["fit", *tiny_fit_args(image_folder, epochs=1), "--model.compile", "true"])
    ckpt = tmp_path / "logs" / "eecnn" / "version_0" / "checkpoints" / "last.ckpt"
    names = torch.load(ckpt, weights_only=True)["state_dict"]
    assert names and not any("_orig_mod" in name for name in names)  # compiled in place: the usual names
    run(["test", "--ckpt_path", str(ckpt), "--model.compile", "false"])


def test_an_agent_trains_against_a_measured_latency_profile_and_reports_time_saved(trained_run, tmp_path,
                                                                                    monkeypatch):
    from early_exit.latency import main as latency

    monkeypatch.chdir(tmp_path)
    latency([str(trained_run / "checkpoints" / "last.ckpt"), "latency.json", "--images", "20"])
    profile = json.loads((tmp_path / "latency.json").read_text())
    assert len(profile["exit_seconds"]) == 2 and 0 < profile["exit_seconds"][0] < profile["exit_seconds"][1]
    run([*agent_fit_args(trained_run), "--data.costs", "latency.json"])
    ckpt = tmp_path / "logs" / "agent" / "version_0" / "checkpoints" / "last.ckpt"
    run(["test", "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"])
    report = json.loads((tmp_path / "logs" / "eecnn" / "version_0" / "report.json").read_text())
    spent = sum(share * seconds for share, seconds in zip(report["exit_distribution"], profile["exit_seconds"]))
    assert report["time_saved_pct"] == pytest.approx(100 * (1 - spent / profile["full_seconds"]))
    assert all("time_saved_pct" in b for b in report["baselines"])
    assert "max_softmax >= 40% of time saved" in {b["name"] for b in report["baselines"]}  # tuned on its seconds
    (tmp_path / "other.json").write_text('{"stage_seconds": [1, 2, 3]}')
    message = error_of([*agent_fit_args(trained_run), "--data.costs", "other.json"])
    assert message.startswith("eecnn: error: other.json is not a latency profile of a classifier with 2 exits")
