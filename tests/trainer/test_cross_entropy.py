import pytest
import torch

from trainer.objectives.cross_entropy import IGNORE_INDEX, chunked_linear_cross_entropy, cross_entropy_sum


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_chunked_equals_plain_loss_and_gradients(with_bias, chunk_size):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    bias = torch.randn(50, generator=gen, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    params = [hidden, weight] + ([bias] if with_bias else [])

    chunked = chunked_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=chunk_size)
    chunked_grads = torch.autograd.grad(chunked * 0.5, params)
    logits = hidden @ weight.t() + (bias if with_bias else 0)
    plain = cross_entropy_sum(logits, labels)
    plain_grads = torch.autograd.grad(plain * 0.5, params)

    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ignored_rows_cost_nothing():
    hidden = torch.randn(2, 4, 8)
    weight = torch.randn(11, 8)
    labels = torch.full((2, 4), IGNORE_INDEX)
    assert chunked_linear_cross_entropy(hidden, weight, labels).item() == 0.0


def test_no_gradient_work_without_grad():
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, torch.arange(4))
    assert loss.item() == pytest.approx(cross_entropy_sum(hidden @ weight.t(), torch.arange(4)).item(), rel=1e-6)
