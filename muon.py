"""Muon: SGD with momentum whose update of each weight matrix is orthogonalized (Keller Jordan, 2024).

A conv filter's gradient is dominated by a few directions; plain SGD moves the filter mostly along those. Muon
takes the momentum-smoothed update G, reshaped to a matrix (out channels, in channels x kernel height x kernel
width), and replaces it by the nearest semi-orthogonal matrix U V^T (G = U S V^T): the same directions, each
moved by the same amount. Computing U V^T exactly (an SVD) is slow on a GPU; a few Newton-Schulz iterations of a
quintic get every singular value into about [0.7, 1.2], which is all the method needs.

torch.optim.Muon (torch >= 2.9) takes 2-D parameters only and we support torch 2.4, so these few lines do it for
conv filters too. Parameter groups with "orthogonalize": False take plain SGD steps (torch.optim.SGD's rule, L2
weight decay included) in the same optimizer, so one state_dict holds the whole run: BatchNorm shifts, biases and
the classifier head belong there.
"""
import torch

# The quintic's coefficients (Keller Jordan's): steep at 0, so that small singular values grow fast
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About U V^T for g = U S V^T (2-D): `steps` Newton-Schulz iterations x <- a x + b (x x^T) x + c (x x^T)^2 x,
    which map each singular value s of x to a s + b s^3 + c s^5 and keep U and V."""
    a, b, c = NS_COEFFICIENTS
    x = g.float() / (g.norm() + 1e-7)  # the Frobenius norm bounds the largest singular value: all now <= 1
    tall = x.shape[0] > x.shape[1]
    if tall:  # x x^T is then the smaller of the two Gram matrices
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Per group: lr, momentum, nesterov, weight_decay and orthogonalize (True: Muon's step; False: SGD's).

    Muon's step for a weight W of shape (out, ...) with gradient g:
        buf = momentum * buf + g                                (buf = g at the first step)
        u   = g + momentum * buf if nesterov else buf
        O   = orthogonalize(u viewed as out x rest) * sqrt(max(1, out / rest))
        W   = W * (1 - lr * weight_decay) - lr * O
    The sqrt factor keeps tall matrices' steps as large per entry as wide ones'."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, orthogonalize: bool = True):
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay, "orthogonalize": orthogonalize})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if decay and not group["orthogonalize"]:
                    g = g.add(p, alpha=decay)  # SGD's L2 penalty, as its gradient
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(g)
                buf = state["momentum_buffer"]
                update = g.add(buf, alpha=momentum) if group["nesterov"] else buf
                if group["orthogonalize"]:
                    matrix = update.reshape(len(update), -1)
                    update = orthogonalize(matrix).view_as(p) * max(1, matrix.shape[0] / matrix.shape[1]) ** 0.5
                    p.mul_(1 - lr * decay)  # decoupled: the orthogonal step has no room for an L2 gradient
                p.add_(update, alpha=-lr)
