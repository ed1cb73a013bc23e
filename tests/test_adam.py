"""Our fused Adam against torch.optim.Adam: the same update, step for step."""
import pytest
import torch

from shapeflow.solvers.adam import Adam


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    params = [torch.randn(5, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)]
    return a, b, params


def _loss(a, b, params):
    x, y = params
    return ((a @ x - b) ** 2).sum() + (y ** 4).sum() + (x[:2] * y[:, 0].sum()).sum()


@pytest.mark.parametrize("lr", [1e-3, 3e-2])
def test_adam_takes_torch_adams_steps(lr):
    a, b, start = _problem(0)
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    mine, reference = Adam(ours, lr=lr), torch.optim.Adam(theirs, lr=lr)
    for _ in range(40):
        for params, opt in ((ours, mine), (theirs, reference)):
            opt.zero_grad()
            _loss(a, b, params).backward()
            opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours[0], start[0])


def test_a_parameter_without_gradient_is_left_alone_and_keeps_its_step_count():
    a, b, start = _problem(1)
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    mine, reference = Adam(ours, lr=1e-2), torch.optim.Adam(theirs, lr=1e-2)
    for step in range(12):
        for params, opt in ((ours, mine), (theirs, reference)):
            opt.zero_grad()
            loss = _loss(a, b, params) if step % 3 else ((a @ params[0] - b) ** 2).sum()  # y without grad
            loss.backward()
            opt.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_bad_learning_rate_is_refused():
    with pytest.raises(ValueError, match="lr"):
        Adam([torch.zeros(2, requires_grad=True)], lr=0.0)
