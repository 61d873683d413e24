"""Data parallelism: two gloo processes that read different examples keep one model."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from add_fixtures import CFG, build, stream_batch
from sdturbo.train.loop import train_step
from sdturbo.train.parallel import average_gradients, rank_and_world


def test_single_process_is_a_no_op():
    assert rank_and_world() == (0, 1)
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    average_gradients([p])
    assert p.grad.tolist() == [1.0, 2.0]


def _average_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((2, 2), (3,), (1,))]
    params[0].grad = torch.full((2, 2), float(rank))
    params[1].grad = torch.arange(3.0) * (rank + 1)
    average_gradients(params)  # params[2] has no gradient and is skipped
    torch.save([p.grad for p in params], f"{out}.{rank}")
    dist.destroy_process_group()


def test_gradients_are_averaged(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_average_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    for rank in range(2):
        grads = torch.load(f"{out}.{rank}")
        assert grads[0].tolist() == [[0.5, 0.5], [0.5, 0.5]]
        assert grads[1].tolist() == [0.0, 1.5, 3.0]
        assert grads[2] is None


def _train_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    assert rank_and_world() == (rank, world)
    models, optimizers = build()
    losses = train_step(models, optimizers, stream_batch(0, rank, world), CFG, 0)
    student = torch.cat([p.detach().flatten() for p in models.student.parameters()])
    heads = torch.cat([p.detach().flatten() for p in models.discriminator.heads.parameters()])
    torch.save({"student": student, "heads": heads, "losses": losses}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_train_one_model(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_train_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert results[0]["losses"] != results[1]["losses"]  # each rank trained on its own examples ...
    torch.testing.assert_close(results[0]["student"], results[1]["student"], rtol=0, atol=0)  # ... one model
    torch.testing.assert_close(results[0]["heads"], results[1]["heads"], rtol=0, atol=0)
