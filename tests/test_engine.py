import pytest
import torch

from early_exit import ExitAgent
from early_exit.agent import CONTINUE, EXIT, NUM_CONFIDENCE_FEATURES, with_weight
from early_exit.engine import EarlyExitEngine, inference_copy
from early_exit.evaluation import ThresholdPolicy, confidence_scores, path_flops, policy_exits
from early_exit.model import EarlyExitCNN


def random_model(seed: int = 0) -> EarlyExitCNN:
    """Random weights, BatchNorm statistics measured on random images: outputs that differ between images."""
    torch.manual_seed(seed)
    model = EarlyExitCNN(width=0.25, stage_dropout=[0] * 4, head_dropout=[0] * 4)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model(torch.randn(256, 3, 32, 32))
        for head in model.exits:
            head[-1].weight.mul_(5)  # spread the confidences
    return model.eval()


def median_thresholds(model: EarlyExitCNN, images: torch.Tensor) -> ThresholdPolicy:
    """Per-exit max-softmax thresholds at the median: about half the images stop at each exit."""
    with torch.no_grad():
        scores = confidence_scores(torch.stack(model(images), dim=1), "max_softmax")
    return ThresholdPolicy(scores[:, :-1].median(0).values.tolist())


def random_agent(model: EarlyExitCNN, images: torch.Tensor) -> ExitAgent:
    """An untrained agent (a random but deterministic policy of the logits), its exit bias set so that it
    stops on about half of the states ``images`` lead to."""
    torch.manual_seed(0)
    agent = ExitAgent().eval()
    agent.build(model.num_exits, num_classes=10)
    with torch.no_grad():
        agent.q_net[0].weight[:, NUM_CONFIDENCE_FEATURES:] = 0  # decide on the logits, not on the exit index
        features = agent.features(torch.stack(model(images), dim=1))
        q = agent.q_net(with_weight(features, torch.tensor(agent.hparams.compute_weight)))
        agent.q_net[-1].bias[EXIT] -= (q[..., EXIT] - q[..., CONTINUE]).median()
    return agent


def all_exits_reference(model: EarlyExitCNN, policy, images: torch.Tensor):
    """Every exit on every image, then the policy's exit picked: what the engine must reproduce."""
    with torch.no_grad():
        logits = torch.stack(model(images), dim=1)
    exits = policy_exits(policy, logits)
    chosen = logits[torch.arange(len(images)), exits].softmax(-1)
    return exits, chosen.argmax(-1), chosen.max(-1).values


@pytest.mark.parametrize("batch", [1, 2, 257])
@pytest.mark.parametrize("policy_kind", ["thresholds", "agent"])
def test_engine_equals_the_all_exits_computation(batch, policy_kind):
    model = random_model()
    images = torch.randn(batch, 3, 32, 32)
    calibration = torch.randn(64, 3, 32, 32)
    policy = (median_thresholds if policy_kind == "thresholds" else random_agent)(model, calibration)
    exits, predictions, confidence = all_exits_reference(model, policy, images)
    result = EarlyExitEngine(model, policy)(images)
    assert torch.equal(result.exit, exits)
    assert torch.equal(result.prediction, predictions)
    assert torch.allclose(result.confidence, confidence, atol=1e-4)  # stages run on sub-batches: float rounding
    assert torch.equal(result.flops, path_flops(model)[exits])
    if batch == 257:  # the policy must really split the batch for the test to mean anything
        assert len(exits.unique()) >= 2


def count_stage_inputs(model: EarlyExitCNN) -> list[int]:
    """Images each stage is run on, accumulated over calls."""
    counts = [0] * len(model.stages)
    for k, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda module, args, out, k=k: counts.__setitem__(k, counts[k] + len(args[0])))
    return counts


def test_stages_never_run_on_images_that_have_exited():
    model = random_model()
    images = torch.randn(300, 3, 32, 32)
    policy = median_thresholds(model, images)
    exits, _, _ = all_exits_reference(model, policy, images)
    engine = EarlyExitEngine(model, policy)
    counts = count_stage_inputs(engine.model)
    engine(images)
    assert counts == [int((exits >= k).sum()) for k in range(4)]
    assert counts[0] == 300 > counts[1] > counts[2] > counts[3]


def test_when_every_image_stops_at_exit_one_later_stages_never_run():
    model = random_model()
    engine = EarlyExitEngine(model, ThresholdPolicy([0.0, 0.0, 0.0]))
    counts = count_stage_inputs(engine.model)
    result = engine(torch.randn(5, 3, 32, 32))
    assert counts == [5, 0, 0, 0]
    assert (result.exit == 0).all() and (result.flops == path_flops(model)[0]).all()


@pytest.mark.parametrize("head", ["mlp", "pool", "conv"])
def test_the_engine_copy_with_folded_batchnorm_computes_the_same_function(head):
    torch.manual_seed(0)
    model = EarlyExitCNN(width=0.25, head=head)
    with torch.no_grad():
        for _ in range(3):  # BatchNorm statistics far from their initial values
            model(torch.randn(64, 3, 32, 32) * 3 + 1)
    model.eval()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        for original, folded in zip(model(images), inference_copy(model)(images)):
            assert torch.allclose(original, folded, atol=1e-4, rtol=1e-4)
    norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.Dropout, torch.nn.Dropout2d)
    assert not any(isinstance(m, norms) for m in inference_copy(model).modules())
