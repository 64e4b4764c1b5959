"""Checkpoint converters: official diffusion checkpoints -> diffusers ``UNet2DModel`` folders for ``model.pretrained``.

- ``ood_bench.convert.adm``: OpenAI guided-diffusion (ADM) ``UNetModel`` checkpoints (``scripts/convert_adm.py``).
- ``ood_bench.convert.score_sde``: score_sde_pytorch's ``ddpm`` model checkpoints (``scripts/convert_score_sde.py``).

Both write ``<out>/unet`` (config.json + safetensors), ``<out>/scheduler/scheduler_config.json`` and
``<out>/conversion.json`` (what was converted, how), atomically. ``docs/checkpoints.md`` gives the commands.
"""

from ood_bench.convert.common import CheckpointError

__all__ = ["CheckpointError"]
