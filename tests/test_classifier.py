import itertools
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from early_exit import CIFAR10DataModule, EarlyExitClassifier, Lookahead
from early_exit.model import EarlyExitCNN


class RecordExitWeights(Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.weights.append(module.current_exit_weights())


def test_classifier_learns_a_separable_task_and_shifts_exit_weights(image_folder):
    L.seed_everything(0)
    data = CIFAR10DataModule(str(image_folder), download=False, val_size=32, batch_size=32)
    model = EarlyExitClassifier(
        num_classes=4, num_stages=2, width=0.125, exit_weights=[3, 1], final_exit_weights=[1, 3],
        optimizer=lambda params: torch.optim.AdamW(params, lr=0.01),
    )
    recorder = RecordExitWeights()
    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(model, data)
    accuracy = trainer.validate(model, data, verbose=False)[0]
    assert accuracy["val/acc"] > 0.8  # chance is 0.25
    assert accuracy["val/acc_exit1"] > 0.5
    first, last = recorder.weights[0], recorder.weights[-1]
    assert torch.allclose(first, torch.tensor([3.0, 1.0]))  # as given: the final exit's weight is not diluted
    assert last[1] > 2.5 and all(torch.diff(torch.stack(recorder.weights)[:, 1]) >= 0)


def test_exit_weights_must_match_the_exits():
    with pytest.raises(ValueError, match="exit_weights needs 2"):
        EarlyExitClassifier(num_stages=2, width=0.125, exit_weights=[1, 1, 1])


def test_predict_answers_each_image_at_every_exit_whatever_else_is_in_its_batch():
    torch.manual_seed(0)
    model = EarlyExitClassifier(num_classes=4, num_stages=3, width=0.125).eval()
    images = torch.randn(5, 3, 32, 32)
    out = model.predict_step((images, torch.zeros(5)), 0)
    assert out["prediction"].shape == out["confidence"].shape == (5, 3)
    alone = [model.predict_step((image[None], torch.zeros(1)), 0) for image in images]
    assert torch.equal(out["prediction"], torch.cat([a["prediction"] for a in alone]))
    assert torch.allclose(out["confidence"], torch.cat([a["confidence"] for a in alone]), atol=1e-5)


def test_distillation_pulls_early_exits_towards_the_final_exit_only():
    model = EarlyExitClassifier(num_classes=4, num_stages=3, width=0.125, distillation_weight=1.0)
    labels = torch.tensor([0, 1, 2])
    final = torch.randn(3, 4, requires_grad=True)
    agreeing = final.detach().clone().requires_grad_()
    disagreeing = (-final.detach()).requires_grad_()
    losses = model.exit_losses([agreeing, disagreeing, final], labels)
    assert losses[0].abs() < 1e-6 < losses[1]  # loss is the divergence from the final exit, not the labels
    losses[:2].sum().backward()
    assert final.grad is None or not final.grad.any()  # the teacher is not pulled towards its students


def test_weight_decay_spares_norms_and_biases_and_the_linear_schedule_warms_up_then_decays_to_zero():
    model = EarlyExitClassifier(num_classes=4, num_stages=2, width=0.125, head="pool", lr_schedule="linear",
                                warmup_fraction=0.25,
                                optimizer=lambda params: torch.optim.SGD(params, lr=0.4, weight_decay=5e-4))
    model._trainer = SimpleNamespace(estimated_stepping_batches=100)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    norms = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for p in m.parameters()}
    assert norms and norms <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.4 / 25) and max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == 24
    assert all(a >= b for a, b in itertools.pairwise(lrs[25:])) and lrs[-1] < 0.4 / 50


def test_a_whitened_stem_is_computed_once_at_a_fresh_start_and_never_on_resume(image_folder, tmp_path, monkeypatch):
    calls = []
    whiten = EarlyExitCNN.whiten_stem
    monkeypatch.setattr(EarlyExitCNN, "whiten_stem", lambda self, cov: calls.append(cov.shape) or whiten(self, cov))

    def fit(epochs: int, ckpt_path: str | None = None) -> L.Trainer:
        L.seed_everything(0)
        data = CIFAR10DataModule(str(image_folder), download=False, val_size=32, batch_size=32)
        model = EarlyExitClassifier(num_classes=4, num_stages=2, width=0.125, whiten_stem=True, lr_schedule="constant",
                                    optimizer=lambda params: torch.optim.SGD(params, lr=0.01))  # not in hparams
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return trainer

    fit(1).save_checkpoint(tmp_path / "epoch1.ckpt")
    assert calls == [(27, 27)]  # the first batch's 3x3 RGB patches, once
    fit(2, str(tmp_path / "epoch1.ckpt"))
    assert calls == [(27, 27)]  # resuming keeps the trained stem


def test_lookahead_trains_on_its_average_and_resumes_it(image_folder, tmp_path):
    def fit(epochs: int, lookahead: Lookahead | None, ckpt_path: str | None = None):
        L.seed_everything(0)
        data = CIFAR10DataModule(str(image_folder), download=False, val_size=32, batch_size=32)
        model = EarlyExitClassifier(num_classes=4, num_stages=2, width=0.125, lr_schedule="constant",
                                    optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[lookahead] if lookahead else [])
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return trainer, [t for t in model.state_dict().values() if t.is_floating_point()]

    _, plain = fit(1, None)
    _, free = fit(1, Lookahead(every=1, decay=0.0))  # an average that forgets at once changes nothing
    assert all(torch.equal(a, b) for a, b in zip(plain, free))
    lookahead = Lookahead(every=2, decay=0.9)
    trainer, averaged = fit(1, lookahead)  # 5 steps, averaged at steps 2, 4 and the last
    assert not all(torch.allclose(a, b) for a, b in zip(plain, averaged))
    assert all(torch.equal(a, b) for a, b in zip(lookahead.slow, averaged))  # what it validates is the average
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Lookahead(every=2, decay=0.9)
    fit(1, resumed, str(tmp_path / "epoch1.ckpt"))  # max_epochs reached: restores, trains no further
    assert all(torch.equal(a, b) for a, b in zip(resumed.slow, lookahead.slow))


def test_lookahead_refuses_a_decay_it_cannot_average_with():
    with pytest.raises(ValueError, match="decay in \\[0, 1\\)"):
        Lookahead(decay=1.0)
