"""Test-wide settings."""

import torch

# Test models are tiny: one thread is faster than two, and immune to a busy second core.
torch.set_num_threads(1)
