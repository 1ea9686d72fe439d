"""A data-parallel training run that tests/test_distributed.py starts under torchrun.

Every rank trains a gated MLP on digits with continuous BMRS pruning through bmrs.Trainer
on a DistributedDataParallel model, compacts it, re-wraps the compacted network in DDP for
a fine-tuning epoch, and saves what the test compares into OUT/rank<R>.pt. With
``--kill-after K`` rank 1 kills itself (SIGKILL) after epoch K, as a crash would.
"""

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bmrs
from bmrs import distributed
from bmrs.datasets import load_dataset

parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--epochs", type=int, default=6)
parser.add_argument("--kill-after", type=int, default=None)
args = parser.parse_args()

torch.set_num_threads(1)
torch.distributed.init_process_group("gloo")
rank = distributed.rank()

generator = bmrs.seed_everything(0)
data = load_dataset("digits", seed=0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
# a wide initial posterior: pruning starts within a few epochs
bmrs.attach_gates(model, data.train.tensors[0][:2], init_log_scale=-1.0)
distributed.seed_noise(0)
first_noise = next(iter(bmrs.gates(model).values())).sample(4).detach()
ddp = DistributedDataParallel(model)
sampler = torch.utils.data.DistributedSampler(data.train, shuffle=True, seed=0)
train = torch.utils.data.DataLoader(data.train, batch_size=32, sampler=sampler, generator=generator)
val = torch.utils.data.DataLoader(data.val, batch_size=500)
trainer = bmrs.Trainer(ddp, torch.optim.Adam(ddp.parameters(), lr=0.05), kl_reduction="mean", progress=False)


def crash(record):
    if record.epoch == args.kill_after and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)


trainer.fit(
    train, val, args.epochs, finetune_epochs=1, pruning=bmrs.ContinuousPruning(bmrs.make_criterion("bmrs-n-code")),
    checkpoint=args.out / "checkpoint.pt", generator=generator, on_epoch_end=crash,
)

x = data.test.tensors[0][:256]
small = bmrs.compact(ddp, example_input=x)  # the wrapper is accepted: the network inside is compacted
model.eval()
with torch.no_grad():
    gated_out, small_out = model(x), small(x)

# the compacted network trains on in DDP like any other module
small.train()
ddp_small = DistributedDataParallel(small)
optimizer = torch.optim.Adam(ddp_small.parameters(), lr=1e-3)
for inputs, targets in train:
    optimizer.zero_grad()
    F.cross_entropy(ddp_small(inputs), targets).backward()
    optimizer.step()

torch.save(
    {
        "model": model.state_dict(),
        "history": [{k: v for k, v in vars(r).items() if k != "seconds"} for r in trainer.history],
        "gated_out": gated_out,
        "small_out": small_out,
        "small_finetuned": small.state_dict(),
        "first_noise": first_noise,
        "parameter_compression": bmrs.parameter_compression(ddp),
        "kept": bmrs.kept_structures(ddp),
    },
    args.out / f"rank{rank}.pt",
)
torch.distributed.destroy_process_group()
