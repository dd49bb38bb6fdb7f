"""SkyReels-V2's diffusion-forcing timestep matrix, at the granularity of causal blocks (chunks).

Each block has a row counter: 0 means pure noise not yet started (fed t=999, not updated), 1..N means it
is fed the N-step schedule's timestep and updated, N+1 means finished (fed t=0). Block i advances when it
is block 0 or block i-1 has finished; otherwise it lags block i-1 by ``ar_step``. ``ar_step = 0`` makes
every block move together (synchronous mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DFSchedule:
    counters: torch.Tensor     # [iterations, blocks] row counters after each iteration's advance
    timesteps: torch.Tensor    # [iterations, blocks] timestep fed to the model
    update_mask: torch.Tensor  # [iterations, blocks] True where the block is stepped this iteration

    @property
    def iterations(self) -> int:
        return self.counters.shape[0]

    def max_active(self) -> int:
        return int(self.update_mask.sum(1).max()) if self.iterations else 0

    def active_steps(self) -> list[list[tuple[int, int]]]:
        """Per iteration, the blocks it steps as (block, step index 0..N−1), ascending by block."""
        return [[(b, n - 1) for b, (n, on) in enumerate(zip(counters, mask)) if on]
                for counters, mask in zip(self.counters.tolist(), self.update_mask.tolist())]


def timestep_matrix(num_blocks: int, timesteps: list[int], ar_step: int, prefix_blocks: int = 0) -> DFSchedule:
    """The schedule for ``num_blocks`` blocks of which the first ``prefix_blocks`` are clean."""
    n = len(timesteps)
    template = torch.tensor([999] + list(timesteps) + [0], dtype=torch.float32)
    done = n  # a counter at n has taken its last step
    prev = [0] * num_blocks
    prev[:prefix_blocks] = [n + 1] * len(prev[:prefix_blocks])
    rows, masks = [], []
    while not all(p >= done for p in prev):  # plain ints: a long video has thousands of iterations
        new = []
        for i in range(num_blocks):
            new.append(prev[i] + 1 if i == 0 or prev[i - 1] >= done else new[i - 1] - ar_step)
        new = [min(max(c, 0), n + 1) for c in new]
        masks.append([c != p and c != n + 1 for c, p in zip(new, prev)])
        rows.append(new)
        prev = new
    counters = torch.tensor(rows, dtype=torch.long) if rows else torch.zeros(0, num_blocks, dtype=torch.long)
    mask = torch.tensor(masks, dtype=torch.bool) if masks else torch.zeros(0, num_blocks, dtype=torch.bool)
    return DFSchedule(counters=counters, timesteps=template[counters], update_mask=mask)
