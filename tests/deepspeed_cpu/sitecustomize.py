"""Test scaffolding, not shipped behaviour: let Lightning's ``DeepSpeedStrategy`` run on a CPU.

DeepSpeed itself trains on a CPU (its CPU accelerator, with gloo for communication), but Lightning's strategy stops
at three points that only concern CUDA device bookkeeping: ``setup_environment`` refuses a non-CUDA accelerator,
``setup_distributed`` checks CUDA device indices against local ranks, and ``root_device.index`` (None on a CPU) is
passed to DeepSpeed as its device rank. The multi-process tests put this folder on ``PYTHONPATH``, so that every
process Lightning launches imports it first and the three points are bypassed; everything else (ZeRO partitioning,
``deepspeed.zero.Init`` around ``configure_model``, the engine's optimizer step, checkpoints) is DeepSpeed's own.
"""

try:
    import torch
    from lightning.pytorch.strategies import deepspeed as _deepspeed
    from lightning.pytorch.strategies.ddp import DDPStrategy

    _deepspeed.DeepSpeedStrategy.setup_environment = lambda self: DDPStrategy.setup_environment(self)
    _deepspeed._validate_device_index_selection = lambda devices: None
    _deepspeed.DeepSpeedStrategy.root_device = property(lambda self: torch.device("cpu", 0))
except ImportError:  # lightning absent: nothing to patch
    pass
