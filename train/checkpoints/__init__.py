"""Training checkpoints: a persistent tier in the run directory, an optional local tier on each host.

checkpointer.py decides when to save and which tier to resume from;
persistent.py and local.py are the two tiers; fingerprints.py and failures.py
are the checks and the one-line reasons both use.
"""

from train.checkpoints.checkpointer import Checkpointer
from train.checkpoints.persistent import checkpoint_dir, resume_config

__all__ = ["Checkpointer", "checkpoint_dir", "resume_config"]
