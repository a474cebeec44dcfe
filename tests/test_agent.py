import shutil

import lightning as L
import pytest
import torch
from conftest import make_image_folder
from torch.utils.data import DataLoader

from early_exit import ExitAgent, InputError
from early_exit.agent import CONTINUE, EXIT, ExitEnvironment, episode_returns, with_weight
from early_exit.cache import ExitCache, load_classifier
from early_exit.evaluation import (
    SAVINGS,
    ExitOutputs,
    evaluate_exits,
    first_exit,
    operating_curve,
    path_flops,
    policy_exits,
)
from early_exit.model import EarlyExitCNN

CLASSES = 10
MODEL = EarlyExitCNN()  # its measured FLOPs set the costs: exits at 18.8/45.8/72.8/100 %


class GivenExits(L.LightningDataModule):
    """What the agent reads from its data module (an ExitCache in eecnn), here exit outputs given directly."""

    def __init__(self, outputs: ExitOutputs) -> None:
        super().__init__()
        self.train_outputs, self.outputs = outputs, outputs
        self.num_exits, self.num_classes = outputs.num_exits, CLASSES
        self.costs, self.full_cost = path_flops(MODEL), float(MODEL.exit_flops[-1])

    def train_dataloader(self):
        return DataLoader(range(10**9), batch_size=None)  # the agent's steps; its experience is its environment

    def val_dataloader(self):
        return DataLoader([(self.outputs.logits, self.outputs.labels)], batch_size=None)


def untrained_agent(**kwargs) -> ExitAgent:
    agent = ExitAgent(**kwargs)
    agent.build(num_exits=4, num_classes=CLASSES)
    return agent


def synthetic_outputs(right: torch.Tensor, confidence: torch.Tensor) -> ExitOutputs:
    """Exit outputs whose correctness (N, exits) and max-softmax level (N, exits) are given."""
    n, exits = right.shape
    labels = torch.arange(n) % CLASSES
    predicted = torch.where(right, labels[:, None], (labels[:, None] + 1) % CLASSES)
    logits = torch.zeros(n, exits, CLASSES)
    logits.scatter_(2, predicted[..., None], (confidence * 8)[..., None])
    return ExitOutputs(logits, labels)


def train_agent(outputs: ExitOutputs, compute_weight: float = 0.5, weight_range: tuple | None = None,
                steps: int = 500) -> ExitAgent:
    L.seed_everything(0)
    agent = ExitAgent(compute_weight=compute_weight, compute_weight_range=weight_range, num_envs=128,
                      replay_batch_size=256, epsilon_decay_steps=300, target_sync_steps=50, lr=3e-3)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(agent, datamodule=GivenExits(outputs))
    return agent


def exits_of(agent: ExitAgent, outputs: ExitOutputs) -> torch.Tensor:
    return agent.greedy_exits(outputs)


def test_exits_at_the_first_exit_when_it_is_always_right():
    n = 2000
    outputs = synthetic_outputs(torch.ones(n, 4, dtype=torch.bool), torch.rand(n, 4))
    exits = exits_of(train_agent(outputs), outputs)
    assert (exits == 0).float().mean() >= 0.95


def test_continues_to_the_end_when_only_the_final_exit_is_right():
    n = 2000
    right = torch.zeros(n, 4, dtype=torch.bool)
    right[:, 3] = True
    outputs = synthetic_outputs(right, torch.rand(n, 4))
    exits = exits_of(train_agent(outputs), outputs)
    assert (exits == 3).float().mean() >= 0.95


def test_exits_at_the_second_exit_only_on_samples_it_is_confident_and_right_about():
    n = 2000
    easy = torch.arange(n) % 2 == 0
    right = torch.zeros(n, 4, dtype=torch.bool)
    right[:, 1] = easy
    right[:, 2:] = True
    confidence = torch.full((n, 4), 0.3)
    confidence[:, 1] = torch.where(easy, 0.95, 0.2)
    outputs = synthetic_outputs(right, confidence)
    exits = exits_of(train_agent(outputs, compute_weight=0.5), outputs)
    assert (exits[easy] == 1).float().mean() >= 0.9
    assert (exits[~easy] >= 2).float().mean() >= 0.9


def test_one_agent_trained_over_a_range_of_compute_weights_moves_along_the_trade_off():
    n = 2000
    right = torch.zeros(n, 4, dtype=torch.bool)
    right[:, 0] = torch.rand(n) < 0.6  # exit 1 is right on 60 % of images, unpredictably; exits 2 and 3 never
    right[:, 3] = True
    outputs = synthetic_outputs(right, torch.full((n, 4), 0.5))
    agent = train_agent(outputs, weight_range=(0.0, 2.0), steps=800)
    # exiting at exit 1 is worth 0.2 - 0.19 w, going to the end 1 - w: the end below w = 1, exit 1 above
    assert (agent.greedy_exits(outputs, 0.0) == 3).float().mean() >= 0.95
    assert (agent.greedy_exits(outputs, 2.0) == 0).float().mean() >= 0.95
    # Its images look alike (only the exits' agreement differs), so a weight moves whole blocks of them at once:
    # a saving between two blocks is refused in one line that names the two it can reach.
    reached = agent.curve[~agent.curve[:, 0].isnan()]  # measured on validation by trainer.fit
    levels = reached[:, 1].unique().tolist()
    assert len(levels) <= 4 and levels[-1] > 80
    low, high = levels[-2:]
    agent.hparams.target_flops_saved = round((low + high) / 2, 1)
    with pytest.raises(InputError, match=rf"saves {low:.1f} % or {high:.1f} % of FLOPs on validation, nothing within"):
        agent.operating_weight()
    agent.hparams.target_flops_saved = round(high, 1)
    assert agent.operating_weight() == pytest.approx(float(reached[reached[:, 1] == high][0, 0]))
    assert (agent.greedy_exits(outputs) == 0).float().mean() >= 0.95
    agent.hparams.target_flops_saved = 95.0
    with pytest.raises(InputError, match="saves at most"):
        agent.operating_weight()


def test_a_flops_target_lands_within_half_a_point_on_validation_or_is_refused():
    torch.manual_seed(1)  # data on which the trained agent is monotone in the weight, as asserted below
    n = 3000
    right = torch.rand(n, 4) < torch.tensor([0.5, 0.7, 0.85, 0.9])
    confidence = torch.where(right, 0.5 + 0.5 * torch.rand(n, 4), 0.6 * torch.rand(n, 4))  # informative, spread
    outputs = synthetic_outputs(right, confidence)
    agent = train_agent(outputs, weight_range=(-0.3, 1.0), steps=600)
    costs, full = path_flops(MODEL), float(MODEL.exit_flops[-1])
    switch, weights = agent.switch_weights(outputs.logits), torch.linspace(-0.3, 1.0, 261).tolist()
    greedy = torch.stack([agent.greedy_exits(outputs, w) for w in weights])
    assert (greedy.diff(dim=0) <= 0).all()  # what makes the bisection exact: a higher weight never sends further
    assert torch.equal(torch.stack([3 - (switch <= w).sum(-1) for w in weights]), greedy)
    landed = 0
    for target in range(5, 100, 5):
        agent.hparams.target_flops_saved = float(target)
        try:
            weight = agent.operating_weight()
        except InputError as error:
            assert "saves at most" in str(error) or "nothing within 0.5" in str(error)
            continue
        saved = evaluate_exits(agent.greedy_exits(outputs, weight), outputs, costs, full)["flops_saved_pct"]
        assert abs(saved - target) <= 0.5, target
        landed += 1
    assert landed >= 8  # a spread of confidences gives a smooth curve: most targets are reachable


def test_the_operating_curve_is_exact_on_a_hand_computed_policy():
    # Two images, three exits at costs 1, 2, 4 (full 4): image 0 stops at exit 1 from 0.1 on, image 1 at exit 2
    # from 0.3 on and at exit 1 from 0.5 on.
    switch = torch.tensor([[0.1, 0.1], [0.5, 0.3]])
    correct = torch.tensor([[True, False, True], [False, True, True]])
    curve = operating_curve(switch, correct, torch.tensor([1.0, 2.0, 4.0]), 4.0, start=0.0)
    rows = {round(float(s), 1): row.tolist() for s, row in zip(SAVINGS, curve)}
    assert rows[0.0] == pytest.approx([0.0, 0.0, 100.0])   # both at exit 3: 4 FLOPs each
    assert rows[37.5] == pytest.approx([0.1, 37.5, 100.0])  # image 0 at exit 1: (1 + 4) / 2
    assert rows[37.6] == pytest.approx([0.3, 62.5, 100.0])  # image 1 at exit 2 as well: (1 + 2) / 2, right
    assert rows[62.6] == pytest.approx([0.5, 75.0, 50.0])   # image 1 at exit 1, wrong
    assert curve[SAVINGS > 75].isnan().all()


def test_reward_bookkeeping_matches_a_hand_computation():
    features = torch.zeros(2, 3, 7)
    correct = torch.tensor([[False, True, True], [True, False, True]])
    costs = torch.tensor([0.2, 0.3, 0.5])
    env = ExitEnvironment(features, correct, costs, weight_range=(2.0, 2.0), reward_correct=1.0, reward_wrong=-3.0,
                          num_envs=2)
    env.image = torch.tensor([0, 1])
    _, _, rewards, _, done = env.step(torch.tensor([CONTINUE, EXIT]))
    assert rewards.tolist() == pytest.approx([-2.0 * 0.2, 1.0 - 2.0 * 0.2])
    assert done.tolist() == [False, True]
    env.image[1], env.exit[1] = 1, 1  # put the second episode at exit 2, where it is wrong
    _, _, rewards, _, done = env.step(torch.tensor([EXIT, EXIT]))
    assert rewards.tolist() == pytest.approx([1.0 - 2.0 * 0.3, -3.0 - 2.0 * 0.3])
    # an episode's return is the sum of its rewards: image 0 exited at exit 2, image 1 at exit 1
    returns = episode_returns(torch.tensor([True, True]), torch.tensor([1, 0]), costs, 2.0, 1.0, -3.0)
    assert returns.tolist() == pytest.approx([(-2.0 * 0.2) + (1.0 - 2.0 * 0.3), 1.0 - 2.0 * 0.2])


def test_the_last_exit_always_exits():
    env = ExitEnvironment(torch.zeros(4, 2, 6), torch.ones(4, 2, dtype=torch.bool), torch.tensor([0.5, 0.5]),
                          (1.0, 1.0), num_envs=3)
    env.exit[:] = 1
    _, actions, _, _, done = env.step(torch.full((3,), CONTINUE))
    assert done.all() and (actions == EXIT).all() and (env.exit == 0).all()


def reference_step(features, correct, costs, weight, image, exit, action):
    """One episode step, written out plainly."""
    last = features.shape[1] - 1
    done = action == EXIT or exit == last
    reward = -weight * float(costs[exit])
    if done:
        reward += 1.0 if correct[image, exit] else -1.0
    state, next_state = (torch.cat([features[image, k], torch.tensor([weight])]) for k in (exit, min(exit + 1, last)))
    return state, EXIT if done else CONTINUE, reward, next_state, done


def test_vectorised_environment_matches_a_one_sample_reference():
    torch.manual_seed(0)
    features, correct = torch.randn(50, 4, 8), torch.rand(50, 4) > 0.5
    costs = torch.tensor([0.19, 0.27, 0.27, 0.27])
    env = ExitEnvironment(features, correct, costs, weight_range=(0.7, 0.7), num_envs=64)
    for _ in range(20):
        images, exits = env.image.clone(), env.exit.clone()
        actions = torch.randint(2, (64,))
        states, taken, rewards, next_states, done = env.step(actions)
        for i in range(64):
            step = (int(images[i]), int(exits[i]), int(actions[i]))
            s, a, r, s2, d = reference_step(features, correct, costs, 0.7, *step)
            assert torch.equal(states[i], s) and int(taken[i]) == a and bool(done[i]) == d
            assert float(rewards[i]) == pytest.approx(r)
            if not d:
                assert torch.equal(next_states[i], s2)
                assert int(env.image[i]) == int(images[i]) and int(env.exit[i]) == int(exits[i]) + 1
            else:
                assert int(env.exit[i]) == 0


def test_first_exit_picks_the_first_stop_and_forces_the_last():
    stop = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert first_exit(stop).tolist() == [1, 2, 0]


def exit_cache(ckpt, data_dir, cache_dir, **kwargs) -> ExitCache:
    return ExitCache(str(ckpt), data_dir=str(data_dir), download=False, cache_dir=str(cache_dir), **kwargs)


def test_second_cache_run_reuses_the_cache_without_running_the_cnn(trained_run, image_folder, tmp_path, monkeypatch):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    first = exit_cache(ckpt, image_folder, tmp_path)
    first.setup("test", splits=("train",))
    assert first.outputs["test"].logits.shape == (48, 2, 4)
    assert len(first.outputs["train"].labels) + len(first.outputs["val"].labels) == 4 * 48

    def no_cnn(*args, **kwargs):
        raise AssertionError("the CNN ran although the cache exists")

    monkeypatch.setattr("early_exit.cache.run_exits", no_cnn)
    second = exit_cache(ckpt, image_folder, tmp_path)
    second.setup("test", splits=("train",))
    assert torch.equal(first.outputs["test"].logits, second.outputs["test"].logits)


def test_other_images_of_the_same_count_get_their_own_exit_cache(trained_run, image_folder, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    other = make_image_folder(tmp_path / "other", seed=1)  # same layout and counts, other pixels
    caches = [exit_cache(ckpt, folder, tmp_path / "cache") for folder in (image_folder, other)]
    for cache in caches:
        cache.setup("test")
    first, second = (cache.outputs["test"] for cache in caches)
    assert first.logits.shape == second.logits.shape and not torch.equal(first.logits, second.logits)
    assert len(list((tmp_path / "cache").iterdir())) == 4  # val and test of each


def test_data_with_other_classes_than_the_classifier_is_refused_before_the_cnn_runs(trained_run, tmp_path):
    three = make_image_folder(tmp_path / "three")
    for split in ("train", "test"):
        shutil.rmtree(three / split / "stripe")
    cache = exit_cache(trained_run / "checkpoints" / "last.ckpt", three, tmp_path / "cache")
    with pytest.raises(InputError, match="has 3 classes but the classifier 4"):
        cache.setup("test")
    assert not (tmp_path / "cache").exists()


def test_bad_classifier_checkpoints_are_reported(trained_run, trained_agent, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_classifier(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(InputError, match="not an eecnn checkpoint"):
        load_classifier(tmp_path / "other.ckpt")
    agent = ExitAgent.load_from_checkpoint(trained_agent, map_location="cpu")  # built for 2 exits and 4 classes
    with pytest.raises(InputError, match="this agent decides for 2 exits and 4 classes, the classifier has 4 and 10"):
        agent.build(num_exits=4, num_classes=10)


def test_the_agent_learns_and_is_selected_on_held_out_images_only(trained_agent):
    folder = trained_agent.parents[3] / "exit_cache"
    caches = sorted(p.name.split("-data")[1].split("-", 1)[1] for p in folder.iterdir())
    assert caches == ["val.pt", "val_views8-crop4-flip.pt"]  # `eecnn fit` of an agent cached no training images
    hparams = torch.load(trained_agent, weights_only=True)["datamodule_hyper_parameters"]
    cache = ExitCache(hparams["classifier_ckpt"], cache_dir=str(folder), val_views=hparams["val_views"])
    cache.setup("fit")  # it learns from the 8 views of each validation image, as configs/agent.yaml says
    assert cache.train_split == "val_views"
    assert len(cache.train_outputs.labels) == 8 * len(cache.outputs["val"].labels)


def test_val_views_hold_each_validation_image_then_random_crops_and_flips(trained_run, image_folder, tmp_path):
    cache = exit_cache(trained_run / "checkpoints" / "last.ckpt", image_folder, tmp_path, val_views=3)
    cache.setup("fit")
    assert sorted(p.name.split("-data")[1].split("-", 1)[1] for p in tmp_path.iterdir()) == \
        ["val.pt", "val_views3-crop4-flip.pt"]
    val, views = cache.outputs["val"], cache.train_outputs
    assert torch.equal(views.labels, val.labels.repeat(3))
    assert torch.allclose(views.logits[:32], val.logits) and not torch.allclose(views.logits[32:64], val.logits)


def test_val_views_are_augmented_as_the_data_module_augments_training_images(trained_run, image_folder, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["datamodule_hyper_parameters"] |= {"crop_padding": 0, "horizontal_flip": False}
    torch.save(checkpoint, tmp_path / "no-augmentation.ckpt")
    cache = exit_cache(tmp_path / "no-augmentation.ckpt", image_folder, tmp_path / "cache", val_views=3)
    cache.setup("fit")
    assert any(p.name.endswith("-val_views3-crop0.pt") for p in (tmp_path / "cache").iterdir())
    assert torch.allclose(cache.train_outputs.logits, cache.outputs["val"].logits.repeat(3, 1, 1))  # nothing to vary


@pytest.mark.parametrize("class_aware", [False, True])
def test_greedy_exits_on_cached_outputs_are_the_exits_the_engine_asks_for_one_exit_at_a_time(class_aware):
    torch.manual_seed(0)
    outputs = ExitOutputs(torch.randn(500, 4, CLASSES) * 3, torch.randint(CLASSES, (500,)))
    agent = untrained_agent(class_aware=class_aware)
    for weight in (-0.3, 0.2, 1.0):  # the engine passes the logits of the exits reached so far
        with torch.no_grad():  # an exit bias that stops about half the states, so the policy splits the images;
            # a hair off the median, whose state would sit exactly on the boundary, where rounding decides
            q = agent.q_net(with_weight(agent.features(outputs.logits), torch.tensor(weight)))
            agent.q_net[-1].bias[EXIT] -= (q[..., EXIT] - q[..., CONTINUE]).median() + 1e-3
        one_at_a_time = policy_exits(lambda logits, weight=weight: agent(logits, weight), outputs.logits)
        assert torch.equal(agent.greedy_exits(outputs, weight), one_at_a_time)
        assert len(one_at_a_time.unique()) >= 2


def test_the_policy_decides_in_fp32_whatever_precision_the_trainer_runs_in():
    # `eecnn test` and `predict` run test_step and the engine under the Trainer's autocast; the agent was
    # validated (and its FLOPs target read off a curve) in fp32, so its decisions must not move with bf16.
    torch.manual_seed(0)
    logits = torch.randn(4000, 4, CLASSES) * 3
    agent = untrained_agent()
    with torch.no_grad():  # an exit bias that stops about half the states: many decisions near the boundary
        q = agent.q_net(with_weight(agent.features(logits), torch.tensor(0.2)))
        agent.q_net[-1].bias[EXIT] -= (q[..., EXIT] - q[..., CONTINUE]).median()
    fp32 = agent.stops(logits, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(agent.stops(logits, 0.2), fp32)
