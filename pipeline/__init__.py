"""rlhf-pipeline: SFT -> reward model -> PPO (GAE) -> evaluation on the HuggingFace stack.

Importing the package sets ``USE_HUB_KERNELS=NO`` unless the environment already sets it. transformers (>= 5.2x,
with its ``kernels`` dependency) otherwise swaps layers for kernels fetched from the Hub whenever a model on a GPU
switches between ``.train()`` and ``.eval()``. Offline, or with the Hub unreachable, that fetch raises ("Version 2
of 'kernels-community/rotary' is not available in the local cache"), a crash at the first training step, and
where it succeeds the training forward and this pipeline's own decoding can run different code. Set
``USE_HUB_KERNELS=YES`` to opt in.
"""

import os

__version__ = "0.1.0"

os.environ.setdefault("USE_HUB_KERNELS", "NO")
