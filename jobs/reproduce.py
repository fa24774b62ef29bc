"""The reproduce job: rebuilds one image from its manifest row alone (model, scheduler, attention, steps, guidance,
size, seed).

Run as `seedsift reproduce --manifest OUT --prompt-id ID --seed S --out FILE`.
"""

from __future__ import annotations

import argparse
import json
import sys

import fsspec

from jobs.common import add_storage_options, run_job
from orchestrator.output.manifest import Manifest
from orchestrator.output.storage import Output
from orchestrator.run.config import ConfigError


def find_row(output: Output, prompt_id: str, seed: int) -> dict:
    """The committed manifest row of (prompt_id, seed); a clear error when there is none."""
    manifest = Manifest(output)
    manifest.require_run()
    row = manifest.find_row(prompt_id, seed)
    if row is None:
        raise ConfigError(f"{output.uri}: no manifest row for prompt_id {prompt_id!r} and seed {seed}")
    return row


def solver_schedule_for(row: dict, run: dict | None) -> dict | None:
    """The schedule file content a `schedule:<digest>` row was rendered with, from its output's run.json; None for
    a row of a named solver."""
    from actors.models.unified_solver import ScheduleFile

    try:
        return ScheduleFile.recorded_for(row["scheduler"], run)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def reproduce_image(row: dict, solver_schedule: dict | None = None):
    """The image of one manifest row, rendered alone (batch of one) through the same code path as the generator;
    `solver_schedule`: for a row rendered with a searched schedule (solver_schedule_for)."""

    from actors.models import diffusion, families
    from actors.models.embedded import resolve_model
    from actors.models.seeds import batch_noise

    model_path = resolve_model(row["model"])
    scheduler = "default"
    try:
        if solver_schedule is None:
            scheduler = families.scheduler_from_label(model_path, row["scheduler"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # As in a run: the scorer embeds on CPU in float32, the generator renders on its device from those embeddings.
    text_adapter = diffusion.load_adapter(model_path, "text")
    embeds = text_adapter.encode([row["prompt"]], row["guidance"])
    embeds.pop("truncated", None)
    del text_adapter
    # The row's self-attention (sparse attention, Re-ttention); rows written before seedsift recorded it: full.
    render_adapter = diffusion.load_renderer(model_path, scheduler, solver_schedule, row.get("attention") or "full")
    latents = batch_noise([row["seed"]], families.latent_shape(model_path, row["height"], row["width"]))
    return render_adapter.render(embeds, latents, steps=row["steps"], guidance_scale=row["guidance"],
                                 height=row["height"], width=row["width"], seeds=[row["seed"]])[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seedsift reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="the --out of the run (folder or s3:// prefix)")
    parser.add_argument("--prompt-id", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", required=True, help="image file to write (local path or URI)")
    add_storage_options(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from orchestrator.output.images import encode_image

        output = Output(args.manifest, args.storage_options)
        row = find_row(output, args.prompt_id, args.seed)
        pixels = reproduce_image(row, solver_schedule_for(row, Manifest(output).read_run()))
        image_format = args.out.rsplit(".", 1)[-1].lower() if "." in args.out else "png"
        with fsspec.open(args.out, "wb", **output.storage_options) as f:
            f.write(encode_image(pixels, "jpeg" if image_format == "jpg" else image_format))
        print(json.dumps({"prompt_id": row["prompt_id"], "seed": row["seed"], "written": args.out,
                          "original": Manifest(output).image_uri(row), "original_member": row.get("image_member")}))
        return 0

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
