"""Convert an OpenAI guided-diffusion (ADM) checkpoint into a diffusers UNet2DModel folder for ``model.pretrained``.

    python scripts/convert_adm.py 256x256_diffusion_uncond.pt $OOD_BENCH_WEIGHTS/adm_256x256_diffusion_uncond_diffusers
    python run.py experiment=diffguard_table2      # model=adm_imagenet256_uncond reads that folder

The released files 256x256_diffusion_uncond.pt, 256x256_diffusion.pt (1000 classes) and 64x64_diffusion.pt carry
presets (image size, head width, attention order, schedule); for another ADM checkpoint give --image-size and the
flags it was trained with. 128x128_diffusion.pt and 512x512_diffusion.pt cannot be represented (the error says
why). Output: <out>/unet, <out>/scheduler, <out>/conversion.json. See docs/checkpoints.md.
"""

from __future__ import annotations

import sys

from ood_bench.convert.adm import ATTENTION_ORDERS, NOISE_SCHEDULES, convert
from ood_bench.convert.common import converter_parser, run_converter


def main(argv: list[str] | None = None) -> int:
    p = converter_parser(__doc__, "guided-diffusion UNetModel state dict (.pt)")
    p.add_argument("--image-size", type=int, help="training resolution (preset for the released files)")
    p.add_argument("--num-head-channels", type=int, help="ADM's num_head_channels (released files: 64)")
    p.add_argument("--num-heads", type=int, help="ADM's num_heads, when num_head_channels was -1")
    p.add_argument("--attention-order", choices=ATTENTION_ORDERS, help="'new' = use_new_attention_order=True")
    p.add_argument("--noise-schedule", choices=NOISE_SCHEDULES, help="ADM's noise_schedule")
    p.add_argument("--diffusion-steps", type=int, default=1000, help="ADM's diffusion_steps (default 1000)")
    args = p.parse_args(argv)
    return run_converter(
        lambda: convert(
            args.checkpoint,
            args.out,
            image_size=args.image_size,
            num_head_channels=args.num_head_channels,
            num_heads=args.num_heads,
            attention_order=args.attention_order,
            noise_schedule=args.noise_schedule,
            diffusion_steps=args.diffusion_steps,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
