import pytest
import torch

from models.networks import ARCHITECTURES, Normalize, PatchWhitening, build_model

FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048, "vgg16": 512, "fast_cnn": 128, "simple_cnn": 128,
                "linear": 3 * 32 * 32}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_logits_and_representation_shapes(arch):
    model = build_model(arch, num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 7)
    assert model.features(x).shape == (2, FEATURE_DIMS[arch]) == (2, model.feature_dim)


def test_resnet_stem_is_cifar_style():
    body = build_model("resnet50").body
    stem = body[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in body.modules())
    blocks = [m for m in body if m.__class__.__name__ == "Bottleneck"]
    assert len(blocks) == 16  # [3, 4, 6, 3]
    assert len([m for m in build_model("resnet18").body if m.__class__.__name__ == "BasicBlock"]) == 8


def test_normalisation_is_inside_the_model():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    x = torch.tensor([0.5, 0.25, 0.3]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(norm(x), torch.tensor([0.0, 0.0, 0.3]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    model = build_model("fast_cnn")
    assert isinstance(model.normalize, Normalize)
    assert "normalize.mean" in model.state_dict()  # saved with the checkpoint, so eps stays in pixel units


def test_single_channel_inputs():
    for arch in ("resnet18", "simple_cnn"):
        model = build_model(arch, in_channels=1, mean=(0.1307,), std=(0.3081,)).eval()
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the simple CNN has none


def test_bad_names_and_stats_are_explained():
    with pytest.raises(ValueError, match="unknown architecture 'resnet51'.*resnet50"):
        build_model("resnet51")
    with pytest.raises(ValueError, match="one per input channel"):
        build_model("fast_cnn", in_channels=1)


def test_fast_cnn_widths_configurable():
    model = build_model("fast_cnn", widths=(16, 32, 64))
    assert model.features(torch.rand(1, 3, 32, 32)).shape == (1, 64)


def test_patch_whitening_whitens_the_patches_it_was_fitted_on(cifar):
    """Airbench's frozen stem: after fitting, the 2x2 patches of the training images come out decorrelated with
    unit variance (up to the eps regulariser), half of the channels being the negatives of the other half."""

    model = build_model("fast_cnn", whiten=True)
    layer = next(m for m in model.modules() if isinstance(m, PatchWhitening))
    model.train()
    with pytest.raises(RuntimeError, match="never fitted"):
        model(torch.rand(2, 3, 32, 32))
    images = cifar[0][:2000].float() / 255
    assert model.fit_whitening(images) and not model.fit_whitening(images)  # fitted once only
    with torch.no_grad():
        out = layer.conv(model.normalize(images))  # before the GELU
    assert torch.equal(out[:, :12], -out[:, 12:])
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    high_variance = cov.diagonal() > 0.9  # directions whose eigenvalue dwarfs eps come out with variance ~1
    assert high_variance.sum() >= 9
    assert torch.allclose(cov.diagonal()[high_variance], torch.ones(int(high_variance.sum()), dtype=cov.dtype),
                          atol=0.1)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.05
    assert "body.0.fitted" in model.state_dict() and "body.0.conv.weight" in model.state_dict()


def test_patch_whitening_computes_in_fp32_under_bf16_autocast(cifar):
    """Its 45x gains would amplify bf16's rounding of the input (docs/NUMERICS.md): under autocast the layer's
    output is the fp32 computation itself, and the whitened network's input gradient stays nearer fp32's than
    with the layer in bf16."""

    images = cifar[0][:256].float() / 255
    model = build_model("fast_cnn", whiten=True).eval()
    model.fit_whitening(images)
    layer = next(m for m in model.modules() if isinstance(m, PatchWhitening))
    x = model.normalize(images)
    with torch.no_grad():
        fp32 = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = layer(x)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, fp32)

    def input_gradient(bf16: bool, layer_in_bf16: bool = False) -> torch.Tensor:
        xi = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = model.normalize(xi)
            h = torch.nn.functional.gelu(layer.conv(h)) if layer_in_bf16 else layer(h)  # the layer as autocast has it
            logits = model.head(model.body[1:](h))
        return torch.autograd.grad(logits.float().logsumexp(1).sum(), xi)[0].flatten(1)

    reference = input_gradient(bf16=False)
    cosine = {in_bf16: torch.nn.functional.cosine_similarity(input_gradient(True, in_bf16), reference).mean().item()
              for in_bf16 in (False, True)}
    assert cosine[False] > cosine[True], cosine


def test_whiten_eps_sets_how_much_the_stem_amplifies_low_variance_directions(cifar):
    """Each whitened direction comes out with variance eigenvalue / (eigenvalue + eps): airbench's 5e-4 lifts the
    high-frequency directions to ~1, a large eps leaves them far below the dominant direction."""

    images = cifar[0][:2000].float() / 255
    spreads = {}
    for eps in (5e-4, 1.0):
        model = build_model("fast_cnn", whiten=True, whiten_eps=eps)
        layer = next(m for m in model.modules() if isinstance(m, PatchWhitening))
        model.fit_whitening(images)
        with torch.no_grad():
            out = layer.conv(model.normalize(images))[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
        variance = out.var(dim=0)
        spreads[eps] = (variance.max() / variance.min()).item()
        assert variance.max() < 1.0
    assert spreads[5e-4] < 3 < 20 < spreads[1.0]
    with pytest.raises(ValueError, match="whiten_eps must be > 0"):
        build_model("fast_cnn", whiten=True, whiten_eps=0.0)


@pytest.mark.parametrize(("arch", "expected"), [("fast_cnn", 6), ("resnet18", 20)])
def test_batchnorm_folded_into_the_convolutions_computes_the_same_function(arch, expected):
    from models.fusion import fold_batchnorm

    torch.manual_seed(0)
    model = build_model(arch)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics as after training
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    folded, count = fold_batchnorm(model)
    assert count == expected
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    # A negative scale does not commute with the max-pool before it: that BatchNorm stays, the result is the same.
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_bn.weight.data[0] = -1.0
    folded, count = fold_batchnorm(model)
    assert count == expected - (arch == "fast_cnn")
    assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
