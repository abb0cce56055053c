"""Muon's update rule against hand computations, its SGD groups against torch's SGD, and its place in train.py."""
import math

import pytest
import torch

import config
import optim
import train
from model import build_model, find_head
from muon import NS_COEFFICIENTS, Muon, orthogonalize


def quintic(s: float, steps: int = 5) -> float:
    """What orthogonalize does to one singular value s of the normalized matrix, by hand."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def rotation(angle: float) -> torch.Tensor:
    return torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def test_orthogonalize_maps_each_singular_value_through_the_quintic_and_keeps_the_singular_vectors():
    u, v = rotation(0.3), rotation(-1.1)
    g = u @ torch.diag(torch.tensor([3.0, 1.0])) @ v.T
    norm = math.sqrt(3.0 ** 2 + 1.0 ** 2)  # Frobenius
    expected = u @ torch.diag(torch.tensor([quintic(3.0 / norm), quintic(1.0 / norm)])) @ v.T
    assert torch.allclose(orthogonalize(g), expected, atol=1e-5)
    assert torch.allclose(orthogonalize(g.T), expected.T, atol=1e-5)  # tall matrices: the same, transposed


def test_orthogonalize_brings_every_singular_value_near_one():
    g = torch.randn(16, 72, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 100  # one direction dominates the gradient, as in a conv filter's
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.6 and s.max() < 1.25, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(orthogonalize(g).flatten(), (u @ vh).flatten(), dim=0) > 0.95


def test_two_muon_steps_on_a_conv_filter_by_hand():
    """A (2, 1, 1, 2) filter, i.e. a 2x2 matrix; diagonal gradients keep every matrix diagonal, so the steps
    reduce to numbers: Nesterov momentum, the quintic on the normalized diagonal, decoupled weight decay."""
    lr, momentum, decay = 0.1, 0.5, 0.01
    w0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    filt = torch.nn.Parameter(w0.clone().view(2, 1, 1, 2))
    opt = Muon([filt], lr=lr, momentum=momentum, nesterov=True, weight_decay=decay)

    def ortho_diag(d):
        norm = math.hypot(*d)
        return [quintic(x / norm) for x in d]  # an odd polynomial: a negative entry keeps its sign

    g1, g2 = [2.0, 0.5], [-1.0, 3.0]
    w = [1.0, 2.0]
    buf = g1  # the first step: buf = g
    update = [g + momentum * b for g, b in zip(g1, buf)]
    w = [x * (1 - lr * decay) - lr * o for x, o in zip(w, ortho_diag(update))]
    buf = [momentum * b + g for b, g in zip(buf, g2)]
    update = [g + momentum * b for g, b in zip(g2, buf)]
    w = [x * (1 - lr * decay) - lr * o for x, o in zip(w, ortho_diag(update))]

    for g in (g1, g2):
        filt.grad = torch.diag(torch.tensor(g)).view(2, 1, 1, 2)
        opt.step()
    assert torch.allclose(filt.detach().view(2, 2), torch.diag(torch.tensor(w)), atol=1e-6)
    assert filt.view(2, 2)[0, 1] == 0 and filt.view(2, 2)[1, 0] == 0


@pytest.mark.parametrize("nesterov", [False, True])
def test_groups_without_orthogonalization_step_exactly_as_torch_sgd(nesterov):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = Muon(a, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-2, orthogonalize=False)
    sgd = torch.optim.SGD(b, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-2, foreach=False)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in a]
        for params, opt in ((a, ours), (b, sgd)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("name", ["airnet", "simplecnn", "squeezenet1_1"])  # squeezenet: a 1x1-conv classifier
def test_muon_takes_the_filters_and_hidden_layers_sgd_the_head_and_shifts(name):
    model = build_model(name, 10, 3, 32, (8, 16, 16) if name == "airnet" else None)
    args = config.parse_args(["--optimizer", "muon", "--muon-lr", "0.3", "--lr", "0.1", "--bias-lr-scale", "4"])
    groups = optim.make_optimizer(model, args, torch.device("cpu"), 10).param_groups
    by_id = {id(p): g for g in groups for p in g["params"]}
    head = model.get_submodule(find_head(model, 10))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in by_id, name  # AirNet's whitening and BatchNorm scales stay fixed
        elif p.dim() >= 2 and p is not head.weight:
            assert by_id[id(p)]["orthogonalize"] and by_id[id(p)]["lr"] == 0.3, name
        else:
            assert not by_id[id(p)]["orthogonalize"] and by_id[id(p)]["lr"] in (0.1, 0.4), name


def test_a_muon_run_resumes_to_bit_identical_weights(tmp_path, cifar_dir):
    flags = ["--data-dir", str(cifar_dir), "--model", "airnet", "--widths", "8,16,16", "--optimizer", "muon",
             "--nesterov", "--momentum", "0.8", "--weight-decay", "1e-3", "--batch-size", "32", "--augment",
             "--device", "cpu"]  # a constant lr: the schedule of a 1-epoch run would differ from a 2-epoch one
    train.main([*flags, "--epochs", "2", "--out-dir", str(tmp_path / "straight")])
    train.main([*flags, "--epochs", "1", "--out-dir", str(tmp_path / "stopped")])
    after_one = torch.load(tmp_path / "stopped" / "last.pth", weights_only=True)["model"]
    train.main(["--resume", str(tmp_path / "stopped" / "last.pth"), "--epochs", "2"])
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "last.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], after_one[k]) for k in a["model"])  # epoch 2 changed them
    buffers = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    assert len(buffers) == len(b["optimizer"]["state"]) > 0
    assert all(torch.equal(x, s["momentum_buffer"]) for x, s in zip(buffers, b["optimizer"]["state"].values()))
