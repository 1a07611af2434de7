"""Checkpoint files in one process: optimizer state, one set of AdamW moments or one a task."""
import pytest
import torch

from rlds.checkpoint import load_optimizer_bytes, optimizer_bytes


def _stepped_optimizers(params, count):
    optimizers = [torch.optim.AdamW(params, lr=1e-3) for _ in range(count)]
    for n, optimizer in enumerate(optimizers):
        for p in params:
            p.grad = torch.full_like(p, float(n + 1))
        optimizer.step()
    return optimizers


def test_each_tasks_moments_come_back_as_they_were_saved():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    saved = _stepped_optimizers(params, 2)
    fresh = [torch.optim.AdamW(params, lr=5.0) for _ in range(2)]
    load_optimizer_bytes(fresh, optimizer_bytes(saved))
    for before, after in zip(saved, fresh):
        assert after.param_groups[0]["lr"] == 1e-3
        for p in params:
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(before.state[p][name], after.state[p][name])
    # the two sets differ (their gradients did), so a mix-up would show
    assert not torch.equal(fresh[0].state[params[0]]["exp_avg"], fresh[1].state[params[0]]["exp_avg"])


def test_a_checkpoint_with_another_number_of_moment_sets_is_a_clear_error():
    params = [torch.nn.Parameter(torch.zeros(3))]
    data = optimizer_bytes(_stepped_optimizers(params, 1))
    with pytest.raises(ValueError, match="holds 1 sets of AdamW moments and this run has 2.*task_moments"):
        load_optimizer_bytes([torch.optim.AdamW(params) for _ in range(2)], data, where="ckpt/iter_000004")
