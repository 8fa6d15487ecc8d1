"""srlm-engine: Self-Rewarding Language Models, from the sampler to the loop."""
import torch  # noqa: F401  (first: the C++ extension srlm_engine._C links against torch's libraries)
