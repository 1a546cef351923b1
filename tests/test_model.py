"""UNet3D: shapes, gradients, size checks, autocast and channels_last_3d."""

from __future__ import annotations

import pytest
import torch

from liverseg.model import InstanceNorm3d, UNet3D, check_input_size

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("features", "shape"),
    [
        ((4, 8), (16, 18, 20)),
        ((4, 8, 16), (16, 24, 32)),
        ((4, 8, 16, 32), (40, 48, 56)),
        ((3, 5, 7, 9), (24, 16, 32)),
    ],
)
def test_output_shape_for_depths_and_widths(features, shape):
    model = UNet3D(in_channels=1, out_channels=3, features=features)
    assert model.size_multiple == 2 ** (len(features) - 1)
    x = torch.randn(2, 1, *shape)
    assert model(x).shape == (2, 3, *shape)


@pytest.mark.parametrize(
    ("norm", "downsampling", "activation", "dropout"),
    [
        ("instance", "maxpool", "leaky_relu", 0.0),
        ("batch", "strided_conv", "relu", 0.2),
        ("none", "maxpool", "leaky_relu", 0.1),
    ],
)
def test_backward_gives_finite_gradients_for_all_parameters(
    norm, downsampling, activation, dropout
):
    torch.manual_seed(0)
    model = UNet3D(
        in_channels=2,
        out_channels=2,
        features=(4, 8, 16),
        norm=norm,
        dropout=dropout,
        activation=activation,
        downsampling=downsampling,
    )
    x = torch.randn(2, 2, 16, 16, 16)
    model(x).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_instance_norm_is_affine_and_init_is_kaiming():
    torch.manual_seed(0)
    model = UNet3D(features=(4, 8, 16))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    conv = model.encoders[1][0]
    # Kaiming normal for LeakyReLU(0.01), fan_in = 4 * 27: std = sqrt(2 / (1.0001 * 108)).
    # PyTorch's default init would give about 0.056, less than half of it.
    expected_std = (2 / ((1 + 0.01**2) * 108)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.1)
    assert model.head.bias.abs().sum() == 0


def test_invalid_size_names_nearest_valid_sizes():
    model = UNet3D(features=(4, 8, 16, 32))
    with pytest.raises(ValueError, match=r"axis 0; nearest valid: 16 or 24") as info:
        model(torch.zeros(1, 1, 20, 16, 16))
    assert "by 8" in str(info.value) and "(20, 16, 16)" in str(info.value)


def test_check_input_size_reports_every_bad_axis():
    with pytest.raises(ValueError) as info:
        check_input_size((97, 96, 5), 8)
    message = str(info.value)
    assert "axis 0; nearest valid: 96 or 104" in message
    assert "axis 2; nearest valid: 8" in message
    assert "axis 1" not in message
    check_input_size((96, 8, 16), 8)


def test_wrong_input_rank_or_channels_is_rejected():
    model = UNet3D(in_channels=1, features=(4, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, W, H, D\)"):
        model(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, W, H, D\)"):
        model(torch.zeros(1, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"features": (8,)},
        {"norm": "group"},
        {"dropout": 1.0},
        {"downsampling": "avg"},
        {"features": (4, 8, 16), "deep_supervision": 2},
        {"deep_supervision": -1},
    ],
)
def test_bad_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        UNet3D(**kwargs)


def test_deep_supervision_outputs_in_training_only():
    torch.manual_seed(0)
    model = UNet3D(1, 2, features=(4, 8, 16, 32), deep_supervision=2)
    x = torch.randn(2, 1, 16, 24, 32)
    outputs = model(x)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 2, 16, 24, 32),
        (2, 2, 8, 12, 16),
        (2, 2, 4, 6, 8),
    ]
    sum(o.float().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.deep_heads.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert isinstance(logits, torch.Tensor)
    assert torch.allclose(logits, outputs[0].detach(), atol=1e-5)
    # Without deep supervision the model and its state dict are as before.
    plain = UNet3D(1, 2, features=(4, 8, 16, 32))
    assert not any(key.startswith("deep_heads") for key in plain.state_dict())


def test_bf16_autocast_forward_on_cpu():
    torch.manual_seed(0)
    model = UNet3D(features=(4, 8, 16)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == reference.shape
    assert torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits: the two agree to within a few percent of the range.
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max() + 0.05


@pytest.mark.parametrize("in_channels", [1, 3])
def test_channels_last_3d_matches_contiguous(in_channels):
    torch.manual_seed(0)
    model = UNet3D(in_channels=in_channels, features=(4, 8, 16), norm="instance").eval()
    x = torch.randn(2, in_channels, 16, 16, 24)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        fast = model(x.to(memory_format=torch.channels_last_3d))
    # Channels-last eval takes group_norm instead of instance_norm: another summation order.
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_instance_norm_matches_torch_in_both_layouts(training):
    torch.manual_seed(0)
    ours = InstanceNorm3d(6, affine=True)
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    reference = torch.nn.InstanceNorm3d(6, affine=True)
    reference.load_state_dict(ours.state_dict())  # same parameters and keys
    ours.train(training)
    x = torch.randn(2, 6, 5, 7, 9) * 3 + 1
    expected = reference(x)
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        out = ours(x.contiguous(memory_format=layout))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert isinstance(UNet3D(features=(4, 8)).encoders[0][1], InstanceNorm3d)


@pytest.mark.gpu
def test_fp16_autocast_forward_on_cuda():
    model = UNet3D(features=(4, 8, 16)).cuda()
    x = torch.randn(1, 1, 16, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y = model(x.to(memory_format=torch.channels_last_3d))
    assert y.shape == (1, 2, 16, 16, 16) and torch.isfinite(y).all()
