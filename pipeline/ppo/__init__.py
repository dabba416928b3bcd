"""PPO: the math (``core``, ``gae``), checkpoints, merged-copy sampling and the trainer that owns the loop."""
