"""Test-session settings: one torch thread in the test process.

The models under test are small (tiny matmuls gain nothing from threads), and end-to-end tests run Ray actors
or Flower processes beside the test process, so more threads only oversubscribe the cores.
"""

import torch

torch.set_num_threads(1)
