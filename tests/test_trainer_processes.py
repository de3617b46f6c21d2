"""The trainer across processes: two CPU processes train like one, and a run killed with SIGKILL
resumes exactly. Both start fresh Python processes and are marked slow."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_fair.adaptors.format import read_fair_adaptor
from diffusers_fair.training import checkpointing
from helpers.training import ROOT, make_trainer


WORKER = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
import helpers.training as T
from diffusers_fair.training.trainer import DistributionalAlignmentTrainer

tmp = Path({tmp!r})
trainer = T.make_trainer(tmp, **{overrides!r})
kill_at = {kill_at!r}
if kill_at is not None:
    step = trainer.train_step

    def train_step():
        record = step()
        if trainer.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    trainer.train_step = train_step
trainer.train()
trainer.save_adaptor(tmp / "adaptor", name="worker")  # every process calls it; the main one writes
if trainer.accelerator.is_main_process:
    torch.save({{n: p.detach().clone() for n, p in trainer.params.items()}}, tmp / "params.pt")
"""


def _run_worker(tmp_path, overrides, *, kill_at=None, processes=1, port=29571):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), overrides=overrides, kill_at=kill_at))
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    workers = []
    for rank in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true")
        workers.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(w.wait(timeout=1200), w.stderr.read()) for w in workers]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    overrides = dict(num_iterations=2)
    single = make_trainer(tmp_path / "single", **overrides)
    records = single.train()
    results = _run_worker(tmp_path, overrides, processes=2)
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    for a, b in zip(records, log):
        assert a["prompts"] == b["prompts"] and a["kept"] == b["kept"]
        assert a["batch_distribution"] == b["batch_distribution"]
        for key in ("loss", "dal", "semantics", "face_realism", "preserve"):  # age is preserved by default
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
        assert a["preserve_kept"] == pytest.approx(b["preserve_kept"]) and set(a["preserve_kept"]) == {"age"}
    assert read_fair_adaptor(tmp_path / "adaptor").metadata.name == "worker"
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    for name, p in single.params.items():
        # Adam divides by the gradients' magnitude, so round-off in near-zero gradients can move a
        # weight by a small fraction of the learning rate (1e-2).
        torch.testing.assert_close(params[name], p, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_exactly(tmp_path):
    overrides = dict(num_iterations=4, checkpoint_every=2)
    full = make_trainer(tmp_path / "full", **overrides)
    records = full.train()
    (code, stderr), = _run_worker(tmp_path, overrides, kill_at=3)
    assert code == -signal.SIGKILL, stderr[-3000:]
    assert [c.name for c in checkpointing.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-000002"]
    resumed = make_trainer(tmp_path, resume_from="latest", **overrides)
    again = resumed.train()
    assert [r["iteration"] for r in again] == [3, 4]
    for a, b in zip(records[2:], again):
        assert (a["loss"], a["dal"], a["semantics"]) == (b["loss"], b["dal"], b["semantics"])
    for name, p in full.params.items():
        assert torch.equal(p, resumed.params[name]) and torch.equal(full.ema[name], resumed.ema[name]), name


# ---------------------------------------------------------------------------- guards (fast)
class FakeAccelerator:
    """What the trainer's set-up reads of an ``accelerate.Accelerator`` running ``num_processes`` processes."""

    def __init__(self, num_processes: int):
        self.num_processes = num_processes
        self.mixed_precision = "no"
        self.is_main_process = True
        self.process_index = 0
        self.device = torch.device("cpu")


def test_processes_launched_without_accelerate_knowing_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. `accelerate launch --cpu --num_processes 2`, which starts one
    with pytest.raises(ValueError, match="2 processes were launched but accelerate runs 1"):
        make_trainer(tmp_path)


def test_the_batch_must_divide_among_the_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"images_per_prompt \(3\) must be divisible by the number of processes \(2\)"):
        make_trainer(tmp_path, images_per_prompt=3, micro_batch_size=3, accelerator=FakeAccelerator(2))
