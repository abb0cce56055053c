import pytest
import torch

from model import SimpleCNN, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_simplecnn_has_the_seed_guides_62006_parameters():
    assert n_params(SimpleCNN()) == 62_006
    assert n_params(build_model("simplecnn", 10, 3, 32)) == 62_006


def test_simplecnn_takes_mnist_shaped_input():
    model = build_model("simplecnn", 10, 1, 28)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    # fc1 sees 16 x 4 x 4 features for 28 x 28 input (16 x 5 x 5 for 32 x 32)
    assert model.fc1.in_features == 256


def test_build_model_rejects_unknown_names_and_tiny_images():
    with pytest.raises(ValueError, match="unknown model 'resnet1000'"):
        build_model("resnet1000", 10, 3, 32)
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("simplecnn", 10, 3, 12)
