"""A `torch.nn.Linear` that is quick on the few rows of a decoding step as well as on whole sequences.

On CPU, decoding multiplies each weight by one row (one token of one sequence) or a handful: a product bound by how
fast the weight is read from memory. `F.linear` does it at a fraction of the memory bandwidth there (MKL's
matrix-vector product runs on one thread; its small-M matrix product reads the weight slowly). Measured on
SmolLM2-135M's matrices on a 2-core AVX2 machine (`benchmarks/bench_llm.py`), these read the weight about twice as
fast:

- one row: the weight's output rows split into one block per thread, multiplied as a batch (`torch.bmm`), so every
  thread reads its share;
- up to `FEW_ROWS` rows: `W @ x.T`, the weight-major product.

The weight keeps `nn.Linear`'s layout and name, so checkpoints and conversions are unchanged; only the order of the
floating-point sums differs. Training, other devices and longer inputs use `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Inputs of at most this many rows take the weight-major products on CPU.
FEW_ROWS = 16


class Linear(nn.Linear):
    """`nn.Linear` with CPU products for decoding-sized inputs (see the module's docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.device.type != "cpu" or not 0 < rows <= FEW_ROWS or torch.is_grad_enabled() and self.training:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        threads = torch.get_num_threads()
        if rows == 1 and threads > 1 and self.out_features % threads == 0 and self.weight.is_contiguous():
            blocks = self.weight.view(threads, -1, self.in_features)  # (threads, out / threads, in)
            out = torch.bmm(blocks, flat.T.expand(threads, -1, -1)).reshape(1, self.out_features)
        else:
            out = (self.weight @ flat.T).T  # (rows, out_features)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)
