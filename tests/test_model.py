import pytest
import torch

from early_exit.model import EarlyExitCNN, patch_covariance


def conv_flops(c_in: int, c_out: int, size: int) -> int:
    return 2 * c_in * c_out * 9 * size * size


def mlp_flops(c: int, classes: int) -> int:
    return 2 * (c * 2 * c + 2 * c * classes)


def test_every_exit_returns_logits_for_every_image():
    model = EarlyExitCNN(num_classes=10).eval()
    logits = model(torch.randn(3, 3, 32, 32))
    assert [tuple(x.shape) for x in logits] == [(3, 10)] * 4


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_number_of_stages_sets_number_of_exits(stages):
    model = EarlyExitCNN(num_classes=5, num_stages=stages, width=0.125)
    assert len(model(torch.randn(2, 3, 32, 32))) == model.num_exits == stages


def test_exit_flops_match_a_hand_count_on_a_tiny_network():
    model = EarlyExitCNN(num_classes=4, num_stages=2, width=0.125)  # channels 8, 16
    stage1 = conv_flops(3, 8, 32) + conv_flops(8, 8, 32)
    stage2 = conv_flops(8, 16, 16) + conv_flops(16, 16, 16)
    assert model.exit_flops == [stage1 + mlp_flops(8, 4), stage1 + stage2 + mlp_flops(16, 4)]


def test_exit_flops_grow_with_depth_and_match_the_seed_network_shares():
    flops = EarlyExitCNN().exit_flops
    assert flops == sorted(flops) and len(set(flops)) == 4
    shares = [round(100 * f / flops[-1], 1) for f in flops]
    assert shares == [18.8, 45.8, 72.8, 100.0]


def test_dropout_rates_must_cover_every_stage():
    with pytest.raises(ValueError, match="stage_dropout"):
        EarlyExitCNN(num_stages=4, stage_dropout=[0.1, 0.2])


@pytest.mark.parametrize("head", ["mlp", "pool", "conv"])
def test_every_head_answers_at_every_exit_and_its_flops_are_in_the_exit_cost(head):
    model = EarlyExitCNN(num_classes=4, width=0.125, head=head).eval()
    assert [tuple(x.shape) for x in model(torch.randn(2, 3, 32, 32))] == [(2, 4)] * 4
    assert all(f > 0 for f in model.head_flops)
    assert model.exit_flops[1] == sum(model.stage_flops[:2]) + model.head_flops[1]


def test_pool_head_keeps_a_4x4_grid_and_conv_head_costs_two_strided_convs():
    pool = EarlyExitCNN(num_classes=4, num_stages=2, width=0.125, head="pool")  # 8 channels at 16x16, 16 at 8x8
    assert pool.head_flops == [2 * 8 * 16 * 4, 2 * 16 * 16 * 4]  # one linear layer on (channels, 4, 4)
    conv = EarlyExitCNN(num_classes=4, num_stages=1, width=0.125, head="conv")  # 8 channels at 16x16
    assert conv.head_flops == [conv_flops(8, 8, 8) + conv_flops(8, 8, 4) + 2 * 8 * 4]


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="head must be one of mlp, pool, conv"):
        EarlyExitCNN(head="attention")


def test_a_whitened_stem_answers_correlated_images_with_decorrelated_unit_variance_channels():
    torch.manual_seed(0)
    # Smooth, strongly correlated images: neighbouring pixels and channels move together.
    images = torch.nn.functional.avg_pool2d(torch.randn(64, 1, 34, 34), 3, stride=1).repeat(1, 3, 1, 1)
    images = images + 0.1 * torch.randn_like(images)
    model = EarlyExitCNN(num_classes=4, num_stages=1, width=1.0)  # a 64-filter stem: 27 directions and their negations
    model.whiten_stem(patch_covariance(images), eps=0.0)
    conv = model.stages[0][0]
    responses = torch.nn.functional.conv2d(images, conv.weight.detach())  # valid patches only, as measured
    flat = responses.transpose(0, 1).reshape(64, -1)
    covariance = flat[:27] @ flat[:27].T / flat.shape[1]
    assert torch.allclose(covariance, torch.eye(27), atol=2e-2)
    assert torch.equal(conv.weight[27:54], -conv.weight[:27])


def test_batchnorm_without_scales_learns_only_the_shifts():
    model = EarlyExitCNN(num_classes=4, num_stages=2, width=0.125, head="pool", batchnorm_scale=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sum(logits.logsumexp(-1).sum() for logits in model(torch.randn(8, 3, 32, 32))).backward()
    optimizer.step()
    norms = [m for m in model.stages.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    assert all(not torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    assert all(p.requires_grad for p in model.exits.parameters())
