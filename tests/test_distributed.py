"""Two CPU processes with Gloo: shuffle-BN across ranks, and a data-parallel pre-training run.

Each test writes a small worker script and starts it with ``torch.multiprocessing.spawn``
in a fresh interpreter (one thread per process); the workers save what they saw and the
test compares the ranks.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")

HEADER = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    OUT = sys.argv[1]
    PORT = sys.argv[2]

    def setup(rank, world):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT, RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp_path: Path, body: str, timeout: int = 240) -> None:
    script = tmp_path / "worker.py"
    script.write_text(HEADER + textwrap.dedent(body) + textwrap.dedent("""
        if __name__ == "__main__":
            mp.spawn(worker, args=(2,), nprocs=2, join=True)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOCOLAB_QUIET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(free_port())], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"workers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_shuffle_unshuffle_and_gather_across_two_ranks(tmp_path):
    run_workers(tmp_path, """
        from mocolab.distributed import concat_all_gather
        from mocolab.shuffle_bn import batch_shuffle, batch_unshuffle

        def worker(rank, world):
            setup(rank, world)
            dist.init_process_group("gloo")
            torch.manual_seed(rank)  # different local RNGs: rank 0's permutation must win
            x = torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank   # (N=3, C=2) per rank
            shuffled, idx_unshuffle = batch_shuffle(x)
            restored = batch_unshuffle(shuffled * 10, idx_unshuffle)
            torch.save({"x": x, "shuffled": shuffled, "restored": restored, "idx": idx_unshuffle,
                        "gathered": concat_all_gather(x), "world": dist.get_world_size()},
                       os.path.join(OUT, f"rank{rank}.pt"))
            dist.destroy_process_group()
    """)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        assert r["world"] == 2
        assert torch.equal(r["restored"], r["x"] * 10)  # unshuffle restores this rank's order
        assert torch.equal(r["gathered"], torch.cat([r0["x"], r1["x"]]))  # the same keys on both ranks
    assert torch.equal(r0["idx"], r1["idx"])  # one permutation, broadcast from rank 0
    both = torch.cat([r0["shuffled"], r1["shuffled"]])
    assert sorted(both[:, 0].tolist()) == sorted(torch.cat([r0["x"], r1["x"]])[:, 0].tolist())  # a permutation


def test_data_parallel_pretrain_on_two_ranks_then_resume_in_one_process(tmp_path, capsys):
    run_workers(tmp_path, """
        from mocolab.pretrain import pretrain

        def worker(rank, world):
            setup(rank, world)
            res = pretrain(dict(data="shapes", limit=256, epochs=1, batch_size=32, K=128, knn_every=1,
                                arch="convnet", out=os.path.join(OUT, "run"), seed=0), verbose=False)
            assert not dist.is_initialized()  # pretrain leaves the group it created
            torch.save({"model": res.model.state_dict(), "world": res.metrics["world_size"],
                        "shuffle_bn": res.model.shuffle_bn, "knn": res.metrics["knn_acc"]},
                       os.path.join(OUT, f"rank{rank}.pt"))
    """)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["shuffle_bn"] == "ddp"
    sd0, sd1 = r0["model"], r1["model"]
    for key in ("queue", "queue_ptr", "queue_index"):
        assert torch.equal(sd0[key], sd1[key]), key
    params = [k for k in sd0 if k.startswith(("encoder_q.", "encoder_k.")) and "running_" not in k
              and "num_batches" not in k]
    assert params
    for key in params:
        assert torch.equal(sd0[key], sd1[key]), key
    assert int(sd0["queue_ptr"]) == (4 * 32) % 128  # 4 steps of 32 keys gathered from both ranks
    assert r0["knn"] is not None  # rank 0 ran the monitor

    from mocolab.checkpoint import load_checkpoint
    from mocolab.cli import main

    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["epoch"] == 1
    status = main(["pretrain", "--data", "shapes", "--limit", "256", "--epochs", "2", "--batch-size", "32",
                   "--K", "128", "--knn-every", "1", "--arch", "convnet", "--seed", "0",
                   "--out", str(tmp_path / "run"), "--resume", "--device", "cpu"])
    assert status == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2


def test_fit_wraps_the_encoders_each_model_trains_and_unwraps_them(tmp_path, monkeypatch, tiny_encoder):
    """DDP goes around the model's declared trained_encoders only (CMC: one per view), and comes off again."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mocolab import distributed
    from mocolab.moco import MoCo
    from mocolab.multiview import CMC

    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, 16, 16)
        for model in (MoCo(tiny_encoder, dim=8, K=16, shuffle_bn="off"), CMC(tiny_encoder, dim=8, K=16)):
            plain = {name: model.get_submodule(name) for name in model.trained_encoders}
            with monkeypatch.context() as m:
                m.setattr(distributed, "world_size", lambda: 2)  # wrap as a run of several processes does
                distributed.wrap_trained_encoders(model, torch.device("cpu"))
            wrapped = {name for name, child in model.named_children() if isinstance(child, DDP)}
            assert wrapped == set(plain), type(model).__name__
            logits, labels = model(x, x)
            model.loss(logits, labels).backward()
            assert all(p.grad is not None for enc in plain.values() for p in enc.parameters())
            assert not any(isinstance(mod, DDP) for mod in model.eval_encoder().modules())
            distributed.unwrap_trained_encoders(model)
            assert all(model.get_submodule(name) is enc for name, enc in plain.items())
    finally:
        dist.destroy_process_group()
