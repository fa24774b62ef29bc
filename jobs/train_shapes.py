"""The train-shapes job: trains the `embedded:shapes` pipeline on procedural shape scenes, on CPU, from a seed.

Run as `python -m jobs.train_shapes --out DIR`; scripts/train_shapes_model.sh trains and installs the result in
actors/testbed/weights/pipeline. Writes a diffusers folder (safetensors) plus training.json with settings and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from actors.testbed.model import TrainSettings, train_shapes_model
from jobs.common import run_job


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedsift train_shapes", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the trained pipeline (created; overwritten)")
    parser.add_argument("--denoiser", choices=("unet", "dit"), default="unet",
                        help="unet: the embedded:shapes pipeline (VAE, UNet, CLIP); dit: embedded:shapes-dit, a PixArt "
                             "transformer and T5 encoder on the shipped shapes VAE (--vae)")
    parser.add_argument("--vae", default=None, help="with --denoiser dit: the VAE folder (default: the shipped one)")
    parser.add_argument("--checkpoints", default=None, help="also save the EMA pipeline here as step-N folders")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="denoiser steps between checkpoints")
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument(_flag(field.name), type=type(field.default), default=field.default,
                            help=f"default: {field.default}")
    args = parser.parse_args(argv)

    def body() -> int:
        settings = TrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)})
        def log(entry: dict) -> None:
            print(json.dumps(entry), flush=True)

        if args.denoiser == "dit":
            from actors.models.embedded import SHIPPED_MODELS
            from actors.testbed.dit import train_shapes_dit

            summary = train_shapes_dit(args.out, settings, args.vae or SHIPPED_MODELS["shapes"] / "vae", log=log,
                                       checkpoints=args.checkpoints, checkpoint_every=args.checkpoint_every)
        else:
            summary = train_shapes_model(args.out, settings, log=log, checkpoints=args.checkpoints,
                                         checkpoint_every=args.checkpoint_every)
        keys = ("parameters", "vae", "denoiser", "total_seconds", "total_cpu_seconds", "folder_bytes")
        figures = {key: summary[key] for key in keys}
        print(json.dumps(figures, indent=1))
        return 0

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
