"""``python slow_steps.py ARGS``: the soupkit CLI with each training step of the TRL trainers
slowed by 0.25 s, so a test can kill an SFT or reward-model stage between its checkpoints."""

from __future__ import annotations

import sys
import time

from transformers import Trainer

from soupkit.cli import main

_real_step = Trainer.training_step


def _slow_step(self, *args, **kwargs):
    time.sleep(0.25)
    return _real_step(self, *args, **kwargs)


Trainer.training_step = _slow_step
sys.argv = ["soupkit", *sys.argv[1:]]
main()
