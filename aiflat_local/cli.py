"""The ``aiflat-local`` command line. Thin: it parses arguments and calls the library.

User mistakes (missing file, bad SER, wrong shape, missing weights, unwritable
output) print one line on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import AiflatError

EXIT_USER_ERROR = 2


def _log(message: str) -> None:
    click.echo(message, err=True)


def _flat_options(f):
    f = click.option("--expand", "expand_px", type=click.FloatRange(min=0), default=None,
                     help="Expand the dust mask by a disk of this radius (px) before feathering "
                          "[default: 10 for the inpainted-median flat, as the original tool; 3 for the motion flat].")(f)
    f = click.option("--feather", "sigma_px", type=click.FloatRange(min=0), default=None,
                     help="Gaussian feathering sigma of the expanded mask (px) [default: 3; 1.5 for the motion flat].")(f)
    return f


def _flat_params(expand_px: float | None, sigma_px: float | None) -> dict:
    """RunOptions' flat parameters: the user's --expand/--feather apply to both routes; else each route's default."""
    from .flat import FlatParams
    from .pipeline import RunOptions

    defaults = RunOptions()
    out = {}
    for key, params in (("flat", defaults.flat), ("motion_flat_params", defaults.motion_flat_params)):
        out[key] = FlatParams(expand_px=params.expand_px if expand_px is None else expand_px,
                              sigma_px=params.sigma_px if sigma_px is None else sigma_px)
    return out


def _parse_option_pairs(pairs: tuple[str, ...], what: str) -> dict:
    """``KEY=VALUE`` strings -> dict; values parsed as JSON when they are JSON (numbers, lists, true)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=what)
        key, value = pair.split("=", 1)
        try:
            out[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = value
    return out


def _backend_options(f):
    f = click.option("--masker-option", "masker_option", multiple=True, metavar="KEY=VALUE",
                     help="Extra masker parameter (repeatable), e.g. --masker-option threshold=4.")(f)
    f = click.option("--sam-model", default=None, help="SAM model for --masker sam: a weights/ name or a path.")(f)
    return f


def _inpainter_options(f):
    f = click.option("--inpainter-option", "inpainter_option", multiple=True, metavar="KEY=VALUE",
                     help="Extra inpainter parameter (repeatable).")(f)
    f = click.option("--inpaint-model", default=None,
                     help="Diffusion model for --inpainter diffusion: a weights/ name or a path.")(f)
    f = click.option("--ensemble", type=click.IntRange(min=1), default=None,
                     help="Diffusion: N samples with different seeds; median fill, spread saved as inpaint_spread.fits.")(f)
    f = click.option("--seed", "inpaint_seed", type=int, default=None, help="Diffusion: base seed (recorded in report.json).")(f)
    f = click.option("--inpaint-batch-size", type=click.IntRange(min=1), default=None,
                     help="Diffusion: crops per model call (lower it when the GPU runs out of memory).")(f)
    f = click.option("--reroll", default=None, metavar="all|ID[,ID...]",
                     help="Diffusion: draw new samples for these regions (ids from report.json) or all.")(f)
    return f


def _collect_backend_options(masker_option, sam_model, inpainter_option=(), inpaint_model=None, ensemble=None,
                             inpaint_seed=None, reroll=None, inpaint_batch_size=None) -> tuple[dict, dict]:
    m = _parse_option_pairs(masker_option, "--masker-option")
    if sam_model:
        m["model"] = sam_model
    i = _parse_option_pairs(inpainter_option, "--inpainter-option")
    if inpaint_model:
        i["model"] = inpaint_model
    if ensemble is not None:
        i["ensemble"] = ensemble
    if inpaint_seed is not None:
        i["seed"] = inpaint_seed
    if inpaint_batch_size is not None:
        i["batch_size"] = inpaint_batch_size
    if reroll is not None:
        i["reroll"] = "all" if reroll == "all" else [int(v) for v in reroll.split(",") if v.strip()]
    return m, i


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aiflat-local")
def cli() -> None:
    """Remove sensor-dust shadows from solar videos, offline.

    Start with `aiflat-local demo -o demo/`, then `aiflat-local run VIDEO.ser -o OUT/`.
    """


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=Path),
              help="Output directory (created if missing).")
@click.option("--masker", default="auto", show_default=True,
              help="Dust masker backend; auto = motion for a video (dustnet's objects added where the motion "
                   "confirms them; dustnet alone when the frames do not move), dustnet (the shipped learned model, weights/dustnet) for an image.")
@click.option("--flat-method", type=click.Choice(["auto", "motion", "inpaint"]), default="auto", show_default=True,
              help="Video flats: from the frames' motion (auto: when they move enough) or from the inpainted median.")
@click.option("--motion-frames", type=click.IntRange(min=2), default=48, show_default=True,
              help="Frames (evenly spaced) used by the motion flat.")
@click.option("--mask", "mask_path", type=click.Path(path_type=Path), default=None,
              help="Use this mask image (255 = dust) instead of running a masker.")
@click.option("--inpainter", default="harmonic", show_default=True, help="Inpainter backend.")
@_backend_options
@_inpainter_options
@_flat_options
@click.option("--start", "frame_start", type=click.IntRange(min=0), default=0, help="First frame used for the reference.")
@click.option("--stop", "frame_stop", type=click.IntRange(min=1), default=None, help="Stop before this frame.")
@click.option("--step", "frame_step", type=click.IntRange(min=1), default=1, help="Use every N-th frame for the reference.")
@click.option("--memory", "max_memory_mb", type=click.IntRange(min=16), default=256, show_default=True,
              help="Memory budget (MB) of the temporal median.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device for learned backends.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="Precision of learned backends (float16 on CUDA only; default: the backend's choice).")
@click.option("--tiff-scale", type=click.Choice(["half", "unity16"]), default="half", show_default=True,
              help="flat.tif: float32 with unity 0.5 (PixInsight-safe) or the original tool's uint16 65535 = 1.0.")
@click.option("--no-calibrate", is_flag=True, help="Build the flat but do not write calibrated frames.")
@click.option("--quiet", is_flag=True, help="No progress bars or step messages (warnings and errors still shown).")
def run(input_path, outdir, masker, flat_method, motion_frames, mask_path, inpainter, masker_option, sam_model, inpainter_option, inpaint_model,
        ensemble, inpaint_seed, reroll, inpaint_batch_size, dtype, expand_px, sigma_px, frame_start, frame_stop, frame_step, max_memory_mb,
        device, tiff_scale, no_calibrate, quiet):
    """Build a dust flat for INPUT (a SER video or an image) and calibrate it."""
    from .pipeline import RunOptions, run as run_pipeline

    masker_options, inpainter_options = _collect_backend_options(
        masker_option, sam_model, inpainter_option, inpaint_model, ensemble, inpaint_seed, reroll, inpaint_batch_size)
    options = RunOptions(
        masker=masker, flat_method=flat_method, motion_frames=motion_frames, inpainter=inpainter,
        masker_options=masker_options, inpainter_options=inpainter_options, mask_path=str(mask_path) if mask_path else None,
        **_flat_params(expand_px, sigma_px), frame_start=frame_start,
        frame_stop=frame_stop, frame_step=frame_step, max_memory_mb=max_memory_mb, device=device, dtype=dtype,
        calibrate=not no_calibrate, tiff_scale=tiff_scale, progress=not quiet,
    )
    report = run_pipeline(input_path, outdir, options, log=(lambda s: None) if quiet else _log)
    for w in report["warnings"]:
        _log(f"warning: {w}")
    flat = report["flat"]
    _log(f"done in {report['timings_s']['total']:.1f} s: {report['mask']['n_objects']} dust objects, "
         f"{100 * (1 - flat['fraction_exactly_one']):.2f} % of pixels corrected; see {outdir / 'report.html'}")


@cli.command()
@click.argument("video", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output FITS file.")
@click.option("--start", type=click.IntRange(min=0), default=0)
@click.option("--stop", type=click.IntRange(min=1), default=None)
@click.option("--step", type=click.IntRange(min=1), default=1)
@click.option("--memory", "max_memory_mb", type=click.IntRange(min=16), default=256, show_default=True)
@click.option("--quiet", is_flag=True)
def reference(video, output, start, stop, step, max_memory_mb, quiet):
    """Write the exact temporal median of VIDEO (a SER file) as float32 FITS."""
    from .io import write_fits
    from .io.ser import SerReader
    from .reference import temporal_median

    with SerReader(video) as reader:
        for w in reader.warnings:
            _log(f"warning: {w}")
        ref = temporal_median(reader, start=start, stop=stop, step=step, max_memory_mb=max_memory_mb,
                              progress=not quiet)
    write_fits(output, ref, {"CREATOR": f"aiflat-local {__version__}", "IMAGETYP": "reference",
                             "FRSTART": start, "FRSTEP": step}, protect=(video,))
    _log(f"wrote {output}")


@cli.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output PNG (255 = dust).")
@click.option("--masker", default="auto", show_default=True,
              help="Dust masker backend; auto = motion for a SER video (its frames are used, as by `run`), "
                   "dustnet (the shipped learned model, weights/dustnet, checksum verified) for an image; "
                   "classical needs no weights; sam, ...")
@_backend_options
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def mask(image, output, masker, masker_option, sam_model, device):
    """Detect dust in IMAGE (FITS/TIFF/PNG/JPEG/XISF, or a SER video: its median and frames) and write the mask."""
    from contextlib import nullcontext

    from .io import detect_format, read_image, write_mask
    from .masks import MASKERS
    from .pipeline import masker_reference

    video = detect_format(image) == "ser"
    if masker == "auto":
        masker = "motion" if video else "dustnet"
    options, _ = _collect_backend_options(masker_option, sam_model)
    if MASKERS.accepts(masker, "device"):
        options.setdefault("device", device)
    backend = MASKERS.create(masker, **options)  # before the median: missing weights fail fast
    if video:
        from .io.ser import SerReader
        from .reference import temporal_median

        context = SerReader(image)
    else:
        context = nullcontext()
    with context as reader:
        ref = masker_reference(temporal_median(reader, progress=True) if video else read_image(image)[0], reader)
        result = backend(ref, frames=reader)
    write_mask(output, result.binary, protect=(image,))
    _log(f"wrote {output}: {int(result.binary.sum())} dust pixels ({masker})")


@cli.command()
@click.argument("pred_mask", type=click.Path(path_type=Path))
@click.argument("ref_mask", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--min-area", type=click.IntRange(min=1), default=9, show_default=True, help="Smallest object (px).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Object match tolerance (px).")
def compare(pred_mask, ref_mask, as_json, min_area, tolerance):
    """Agreement of PRED_MASK with REF_MASK: pixel IoU, Dice, object recall/precision/F1."""
    from .errors import InputError
    from .io import read_mask
    from .metrics import compare_masks, format_table

    pred, ref = read_mask(pred_mask), read_mask(ref_mask)
    if pred.shape != ref.shape:
        raise InputError(f"mask shapes differ: {pred_mask} is {pred.shape[1]} x {pred.shape[0]}, "
                         f"{ref_mask} is {ref.shape[1]} x {ref.shape[0]}")
    metrics = compare_masks(pred, ref, min_area=min_area, tolerance_px=tolerance)
    click.echo(json.dumps(metrics, indent=2) if as_json else format_table(metrics))


@cli.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--flat", "flat_path", required=True, type=click.Path(path_type=Path),
              help="Flat (FITS/TIFF/XISF); 1.0 = no change unless --flat-unity says otherwise.")
@click.option("--flat-unity", type=float, default=None,
              help="Value that means 'no change' in the flat file (default: 1.0, or 0.5/65535 as recorded "
                   "in our own flat.tif/flat.xisf).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True)
def calibrate(input_path, flat_path, flat_unity, output, quiet):
    """Divide INPUT (SER video or image) by an existing flat and write OUTPUT."""
    from .calibrate import calibrate_image, calibrate_ser
    from .flat import read_flat
    from .io import detect_format, read_image, write_fits

    flat, unity = read_flat(flat_path, unity=flat_unity)
    if detect_format(input_path) == "ser":
        stats = calibrate_ser(input_path, flat, output, progress=not quiet)
    else:
        image, iinfo = read_image(input_path)
        out, stats = calibrate_image(image, flat, dtype=np.dtype(iinfo.dtype))
        write_fits(output, out, {"CREATOR": f"aiflat-local {__version__}", "FLAT": str(flat_path)},
                   protect=(input_path,))
    _log(f"wrote {output} (flat unity {unity:g}; clipped high {stats.n_clipped_high}, low {stats.n_clipped_low})")


@cli.command()
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=(int, int), default=(480, 640), show_default=True, metavar="H W")
@click.option("--frames", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--f-ratio", type=click.FloatRange(min=1), default=30.0, show_default=True)
@click.option("--obstruction", type=click.FloatRange(0, 0.9), default=0.0, show_default=True,
              help="Central obstruction ratio (0 = refractor; > 0 gives donut shadows).")
@click.option("--drift", type=click.FloatRange(min=0), default=6.0, show_default=True, help="Total drift (px).")
@click.option("--jitter", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Seeing jitter rms (px).")
@click.option("--quiet", is_flag=True)
def simulate(outdir, seed, size, frames, f_ratio, obstruction, drift, jitter, quiet):
    """Write a simulated dusty solar SER video with its ground truth into OUTDIR."""
    from .synth import SimConfig, simulate as run_sim

    config = SimConfig(height=size[0], width=size[1], n_frames=frames, seed=seed, f_ratio=f_ratio,
                       central_obstruction=obstruction, drift_px=drift, jitter_px=jitter)
    paths = run_sim(outdir, config, progress=not quiet)
    _log(f"wrote {paths.video} and its ground truth in {paths.directory}")


@cli.command()
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def demo(outdir, seed, quiet):
    """Simulate a dusty solar video, run the whole pipeline on it and score the result."""
    from .demo import run_demo

    summary = run_demo(outdir, seed=seed, progress=not quiet, log=_log)
    click.echo(summary)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
             add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args):
    """Train the dustnet masker from the simulator (`train --help` for the options).

    The same command as `python -m aiflat_local.train`, with the same options:
    `--out DIR` (required), `--tiny` (seconds; proves the code runs),
    `--threads N`, `--recalibrate`, and every training setting. The shipped
    model: `aiflat-local train --out weights/dustnet` (about 37 min on 2 cores).
    """
    from .train import main as train_main

    try:
        return train_main(list(args), prog="aiflat-local train")
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2, its message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR


@cli.group()
def weights() -> None:
    """The local model store in weights/ (no network, ever)."""


@weights.command("list")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="Weights directory (default: $AIFLAT_WEIGHTS or ./weights).")
def weights_list(directory):
    """Show known models, whether they are present, and how to get them."""
    from .weights import WeightStore

    click.echo(WeightStore(directory).describe())


@weights.command("verify")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None)
def weights_verify(directory):
    """Check the sha256 of every present weights file against the manifest."""
    from .weights import WeightStore

    problems = WeightStore(directory).verify_all(log=_log)
    if problems:
        raise AiflatError(f"{problems} weights file(s) failed verification")


@weights.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Model name in the manifest (default: guessed from the files).")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None)
def weights_import(source, name, directory):
    """Copy a downloaded checkpoint file or model folder into the store and record its checksums."""
    from .weights import WeightStore

    entry = WeightStore(directory).import_path(source, name=name)
    _log(f"imported {source} as {entry['name']}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI, turn user errors into one line and exit code 2."""
    try:
        rv = cli.main(args=argv, prog_name="aiflat-local", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aiflat-local: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except AiflatError as exc:
        click.echo(f"aiflat-local: error: {exc}", err=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        click.echo("aiflat-local: interrupted", err=True)
        return 130
    except OSError as exc:  # environment problems: disk full, permissions, ...
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        click.echo(f"aiflat-local: error:{where} {exc.strerror or exc}", err=True)
        return EXIT_USER_ERROR
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
