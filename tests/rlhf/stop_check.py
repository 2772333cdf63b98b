"""torchrun helper for test_faults: only rank 1 gets SIGTERM, during step 2; each rank prints the
step after which ``GracefulStop.agreed`` tells it to stop (both must say step 2)."""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

from soupkit.stopping import GracefulStop

dist.init_process_group("gloo")
rank = dist.get_rank()
with GracefulStop(announce=False) as stop:
    for step in range(1, 6):
        if rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        dist.barrier()  # the step's own collectives
        if signum := stop.agreed():
            print(f"rank {rank} stops after step {step} on signal {signum}", flush=True)
            break
dist.destroy_process_group()
