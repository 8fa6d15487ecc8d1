"""srlm-engine: Self-Rewarding Language Models, from the sampler to the loop."""
import os

# OpenMP threads that spin while waiting made small decode steps 3-4x slower whenever another
# process shared the cores (measured on the 2-core CI machine). Passive waiting costs little on
# an idle machine. It must be set before torch loads its OpenMP runtime; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402,F401  (before srlm_engine._C, which links against torch's libraries)
