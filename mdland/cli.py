"""The one CLI: `mdland <stage> ...`."""

import argparse
import json
import sys

from mdland.log import setup_logging


def _ingest(a: argparse.Namespace) -> None:
    from mdland.data.ingest import ingest

    m = ingest(a.format, a.src, a.dest, size=a.size, margin=a.margin, rows_per_shard=a.rows_per_shard,
               skip_bad=a.skip_bad, overwrite=a.overwrite, ffhq_variant=a.ffhq_variant, image_dir=a.image_dir,
               source=a.source, style=a.style, prompt=a.prompt)
    print(json.dumps({"count": m["count"], "shards": len(m["shards"]), "skipped": len(m["skipped"])}))


def _render(a: argparse.Namespace) -> None:
    from mdland.data.preview import write_preview

    n = write_preview(a.src, a.out, a.count, a.columns, a.format, a.condition, a.image_dir)
    print(f"drew {n} faces into {a.out}")


def _evaluate_preds(a: argparse.Namespace) -> None:
    from mdland.detector.evaluate import evaluate_predictions, metrics_table

    result = evaluate_predictions(a.pred, a.gt, a.out, a.norm, a.threshold, a.name, a.format)
    print(metrics_table([result]), end="")


def _train_controlnet(a: argparse.Namespace) -> None:
    from mdland.config import load_config
    from mdland.diffusion.train import ControlNetTrainConfig, run_training

    config = load_config(ControlNetTrainConfig, _named_config(a.config), a.set)
    result = run_training(config, local=a.local)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, default=str))


def _serve(a: argparse.Namespace) -> None:
    import signal
    import time

    from mdland.config import parse_overrides
    from mdland.serve.app import ServeConfig, start_server, stop_server

    # ServeConfig fields plus deployment options (num_replicas, ...); build_app checks every key.
    args = {"detector": a.detector, **parse_overrides(a.set, ServeConfig)}
    # `ray job stop` and `kill` send SIGTERM: the same way out as Ctrl-C, or the app outlives its job.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:  # Ctrl-C, while Serve starts too
        url = start_server(args, a.host, a.port)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # again: Ray's start set one of its own
        print(f"serving {a.detector} at {url}/v1/landmarks (docs: {url}/docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray's own SIGTERM handler, while Ray starts
        stop_server()
        print("stopped", flush=True)


def _generate(a: argparse.Namespace) -> None:
    from mdland.config import load_config
    from mdland.generation.pipeline import run_generation
    from mdland.generation.plan import GenerateConfig

    print(json.dumps(run_generation(load_config(GenerateConfig, _named_config(a.config, "generation"), a.set))))


def _bench(a: argparse.Namespace) -> None:
    from mdland import bench

    if a.what == "train":
        result = bench.bench_train(a.preset, a.batch_size, a.resolution, a.steps, a.warmup, a.compile,
                                   a.zero_stage, a.cache_latents, a.profile, a.rounds)
    elif a.what == "detector":
        result = bench.bench_detector(a.arch, a.batch_size, a.repeats, a.warmup)
    elif a.what == "serve":
        result = bench.bench_serve(a.arch, a.requests, a.clients, a.batch_size, a.replicas)
    elif a.what == "write":
        result = bench.bench_write(a.images, a.count, a.rows_per_shard, a.batch_size, a.output)
    else:
        result = bench.bench_generate(a.preset, a.batch_size, a.resolution, a.steps, a.guidance, a.repeats,
                                      a.compile, a.pipeline, a.pipeline_images, a.profile, a.channels_last, a.rounds,
                                      a.compile_mode)
    bench.write_result(result, a.out)


def _named_config(name: str | None, stage: str = "diffusion") -> str | None:
    """A config file path, or the name of one shipped in mdland/<stage>/configs (e.g. `stage1`, `tiny`)."""
    from pathlib import Path

    if name is None or Path(name).exists():
        return name
    configs = Path(__file__).parent / stage / "configs"
    if (configs / f"{name}.yaml").exists():
        return str(configs / f"{name}.yaml")
    shipped = ", ".join(sorted(p.stem for p in configs.glob("*.yaml")))
    raise ValueError(f"--config {name}: no such file, nor a shipped config ({shipped})")


def _train_detector(a: argparse.Namespace) -> None:
    from mdland.config import load_config
    from mdland.detector.train import DetectorTrainConfig, run_training

    result = run_training(load_config(DetectorTrainConfig, _named_config(a.config, "detector"), a.set), local=a.local)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, default=str))


def _evaluate(a: argparse.Namespace) -> None:
    from pathlib import Path

    from mdland.detector.evaluate import evaluate_detector, metrics_table

    formats = [None if f == "shards" else f for f in a.format or [None]]
    if len(formats) not in (1, len(a.data)):
        raise ValueError("give one --format for all sets or one per --data")
    sets = []
    for i, spec in enumerate(a.data):
        name, _, path = spec.partition("=")
        if not path or "/" in name or ":" in name:  # no NAME= (a path may hold "=", as in s3://b/year=2024)
            name, path = Path(spec.rstrip("/")).name, spec
        sets.append((name, path, formats[i if len(formats) > 1 else 0]))
    names = [name for name, _, _ in sets]
    if len(set(names)) < len(names):
        raise ValueError(f"--data: two sets named {sorted({n for n in names if names.count(n) > 1})}; "
                         "name them with NAME=PATH")
    rows = evaluate_detector(a.detector, sets, a.out, a.skip_bad, a.batch_size, a.threshold, a.norm, a.image_dir)
    print(metrics_table(rows), end="")


def _predict(a: argparse.Namespace) -> None:
    from mdland.detector.predict import predict_folder

    print(json.dumps(predict_folder(a.detector, a.src, a.out, a.boxes, a.batch_size, a.skip_bad)))


def _demo(a: argparse.Namespace) -> None:
    from mdland.demo import DemoSize, run_demo
    from mdland.detector.evaluate import metrics_table

    sizes = DemoSize(train=a.train, test=a.test, controlnet_steps=a.steps, styles=a.styles,
                     images_per_style=a.images_per_style, detector_epochs=a.epochs, seed=a.seed)
    print(metrics_table(run_demo(a.out, a.storage, sizes)["metrics"]), end="")


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1], as an NME threshold is (0.10 is 10%)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] (0.10 for 10%), got {text}")
    return value


def port(text: str) -> int:
    """An argparse type: a TCP port number."""
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


# Repeatable, each adding to the list: `--set a=1 --set b=2` sets both.
SET_OPTION = dict(action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def build_parser() -> argparse.ArgumentParser:
    from mdland.data.ingest import FORMATS, SIDECAR_FORMATS
    from mdland.detector.metrics import NORMALISATIONS
    from mdland.generation.plan import COMPILE_MODES

    parser = argparse.ArgumentParser(prog="mdland", description=__doc__)
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    # Also after the stage (the jobs put the stage first); SUPPRESS keeps a level given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    metric_options = argparse.ArgumentParser(add_help=False, parents=[common])  # shared by evaluate and evaluate-preds
    metric_options.add_argument("--norm", default="inter_ocular", choices=NORMALISATIONS,
                                help="NME normaliser: outer eye corners (default), pupils or box size")
    metric_options.add_argument("--threshold", type=fraction, default=0.10,
                                help="FR / AUC threshold on the NME, a fraction (0.10: 10%%)")

    p = sub.add_parser("ingest", parents=[common], help="turn an annotated image folder into shards")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("src", help="source folder (or the TSV / JSON file for star-tsv / ffhq)")
    p.add_argument("dest", help="output dataset: local path or s3://bucket/prefix")
    p.add_argument("--size", type=count, default=256, help="stored image size (square)")
    p.add_argument("--margin", type=positive, default=1.25, help="crop side / landmark box side")
    p.add_argument("--rows-per-shard", type=count, default=1000)
    p.add_argument("--skip-bad", action="store_true", help="log and skip bad faces instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DEST")
    p.add_argument("--ffhq-variant", default="image", choices=["image", "in_the_wild"])
    p.add_argument("--image-dir", help="star-tsv: folder the TSV's image paths are relative to")
    p.add_argument("--source", help="name stored in the `source` column (default: the format)")
    p.add_argument("--style", default="", help="the faces' domain, e.g. caricature (stage 2's multi-domain sets)")
    p.add_argument("--prompt", help="their prompt (default: the shipped prompt of --style; none without a style)")
    p.set_defaults(run=_ingest)

    p = sub.add_parser("render", parents=[common], help="draw landmarks over images into a PNG grid")
    p.add_argument("src", help="shard dataset, one .parquet shard, or a raw folder with --format")
    p.add_argument("out", help="output PNG")
    p.add_argument("--format", choices=FORMATS, help="read SRC as a raw annotated folder of this format")
    p.add_argument("--image-dir", help="star-tsv: folder the TSV's image paths are relative to (default: its own)")
    p.add_argument("--count", type=count, default=16)
    p.add_argument("--columns", type=count, default=4)
    p.add_argument("--condition", action="store_true", help="also show each face's condition image")
    p.set_defaults(run=_render)

    p = sub.add_parser("evaluate-preds", parents=[metric_options],
                       help="NME / FR / AUC and a CED plot from prediction and truth files")
    p.add_argument("pred", help="folder of .pts/.txt (searched recursively), an (N,68,2) .npy, or a shard dataset")
    p.add_argument("gt", help="same kinds as PRED; faces are paired by key (file stem, or path where names repeat "
                              "across folders; row index; `key` column). A shard dataset's landmarks are in its "
                              "stored crops' pixels: score predictions on those")
    p.add_argument("--format", choices=SIDECAR_FORMATS, help="read GT as an annotated image folder of this ingest "
                                                             "format (keys: its images', as `mdland predict` names "
                                                             "its files)")
    p.add_argument("--out", help="folder for metrics.json, metrics.md and ced.png")
    p.add_argument("--name", default="predictions")
    p.set_defaults(run=_evaluate_preds)

    p = sub.add_parser("train-controlnet", parents=[common],
                       help="stage 1 / stage 2: train the landmark ControlNet (Ray Train)")
    p.add_argument("--config", help="YAML file, or a shipped one: stage1, stage2, tiny-stage1, tiny-stage2")
    p.add_argument("--set", **SET_OPTION)
    p.add_argument("--local", action="store_true", help="run train_func in this process, without Ray (debugging)")
    p.set_defaults(run=_train_controlnet)

    p = sub.add_parser("train-detector", parents=[common],
                       help="fine-tune the STAR detector on shards (Ray Train + DeepSpeed)")
    p.add_argument("--config", help="YAML file, or a shipped one: finetune, tiny")
    p.add_argument("--set", **SET_OPTION)
    p.add_argument("--local", action="store_true", help="run train_func in this process, without Ray (debugging)")
    p.set_defaults(run=_train_detector)

    p = sub.add_parser("evaluate", parents=[metric_options],
                       help="NME / FR@10%% / AUC@10%%, CED plot and overlays of a detector on eval sets")
    p.add_argument("--detector", required=True, help="detector checkpoint (.pkl: STAR's or mdland's), local or s3://")
    p.add_argument("--data", required=True, action="append", metavar="[NAME=]PATH",
                   help="an evaluation set: shard dataset, or a raw folder with --format (repeatable)")
    p.add_argument("--format", action="append", choices=(*FORMATS, "shards"),
                   help="raw folder format (shards: a shard dataset), one for all or one per set")
    p.add_argument("--image-dir", help="star-tsv: folder the TSVs' image paths are relative to (default: each TSV's)")
    p.add_argument("--out", default="eval-report")
    p.add_argument("--skip-bad", action="store_true", help="log and skip bad faces instead of failing")
    p.add_argument("--batch-size", type=count, default=32)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("predict", parents=[common],
                       help="a detector's landmarks for a folder of images: .pts files, predictions.json, overlays")
    p.add_argument("--detector", required=True, help="detector checkpoint (.pkl: STAR's or mdland's), local or s3://")
    p.add_argument("src", help="local folder of images (searched recursively; each image one face)")
    p.add_argument("--out", required=True, help="folder for <key>.pts, predictions.json, overlays.png; or s3://")
    p.add_argument("--boxes", help="JSON {image key: [x0, y0, x1, y1]}: face boxes (default: the whole image)")
    p.add_argument("--skip-bad", action="store_true", help="log and skip unreadable images or bad boxes")
    p.add_argument("--batch-size", type=count, default=32)
    p.set_defaults(run=_predict)

    p = sub.add_parser("generate", parents=[common],
                       help="the synthetic set: edited landmarks x style prompts -> shards (Ray Data)")
    p.add_argument("--config", help="YAML file of GenerateConfig fields, or the shipped `generate`")
    p.add_argument("--set", **SET_OPTION)
    p.set_defaults(run=_generate)

    p = sub.add_parser("serve", parents=[common], help="host a detector checkpoint over HTTP with Ray Serve")
    p.add_argument("--detector", required=True, help="detector checkpoint (.pkl), local or s3://")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--set", **{**SET_OPTION,
                   "help": "ServeConfig fields (max_batch_size, batch_wait_timeout_s, max_bytes, max_pixels, use_gpu, "
                        "cuda_graphs, ...) and num_replicas / autoscaling_config / ray_actor_options"})
    p.set_defaults(run=_serve)

    p = sub.add_parser("bench", parents=[common], help="speed against a named baseline, in the same process")
    bench = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    # Defaults are the issues' GPU settings; CPU smoke runs pass --preset tiny / --arch tiny and smaller sizes.
    b = bench.add_parser("train", parents=[common], help="ControlNet training step vs a plain bf16-autocast loop")
    b.add_argument("--preset", default="sd15", help="model size: sd15 (GPU) or tiny (a CPU smoke run)")
    b.add_argument("--batch-size", type=count, default=32)
    b.add_argument("--resolution", type=count, default=256)
    b.add_argument("--steps", type=count, default=10, help="timed steps per round")
    b.add_argument("--rounds", type=count, default=3, help="rounds of timed steps, in turns with the baselines")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    b.add_argument("--compile", action="store_true", help="torch.compile ControlNet and UNet (config `compile`)")
    b.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage (config `zero_stage`)")
    b.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                   help="step on cached VAE latents, as Ray Train runs do (config `cache_latents`)")
    b.add_argument("--profile", metavar="PATH", help="also profile 3 steps: PATH.txt (operators by time), PATH.json.gz")
    b = bench.add_parser("generate", parents=[common],
                         help="mdland's sampler (and Ray Data pipeline) vs the stock diffusers pipeline")
    b.add_argument("--preset", default="sd15", help="model size: sd15 (GPU) or tiny (a CPU smoke run)")
    b.add_argument("--batch-size", type=count, default=64)
    b.add_argument("--resolution", type=count, default=256)
    b.add_argument("--steps", type=count, default=50, help="DDIM steps")
    b.add_argument("--guidance", type=float, default=7.5, help="guidance scale")
    b.add_argument("--repeats", type=count, default=1, help="timed batches per round")
    b.add_argument("--rounds", type=count, default=3, help="rounds of timed batches, in turns with the stock pipeline")
    b.add_argument("--compile", action="store_true", help="torch.compile UNet and ControlNet")
    b.add_argument("--compile-mode", choices=COMPILE_MODES, help="torch.compile's mode (config `compile_mode`); compiles")
    b.add_argument("--channels-last", action="store_true", help="channels-last memory (config `channels_last`)")
    b.add_argument("--pipeline", action="store_true", help="also time the Ray Data pipeline")
    b.add_argument("--pipeline-images", type=count, default=512)
    b.add_argument("--profile", metavar="PATH", help="also profile a 3-step batch: PATH.txt, PATH.json.gz (a trace)")
    b = bench.add_parser("detector", parents=[common],
                         help="batched and single-image inference of the STAR network")
    b.add_argument("--arch", default="star-300w", help="star-300w or tiny")
    b.add_argument("--batch-size", type=count, default=32)
    b.add_argument("--repeats", type=count, default=5, help="timed batches")
    b.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    b = bench.add_parser("serve", parents=[common],
                         help="HTTP through Ray Serve vs in-process batched inference")
    b.add_argument("--arch", default="star-300w", help="star-300w or tiny")
    b.add_argument("--batch-size", type=count, default=16, help="max_batch_size of the replica and the in-process batch")
    b.add_argument("--requests", type=count, default=200, help="requests in the load run")
    b.add_argument("--clients", type=count, help="concurrent clients (default: twice the batch size per replica)")
    b.add_argument("--replicas", type=count, default=1, help="replicas sharing the device")
    b = bench.add_parser("write", parents=[common],
                         help="the generation pipeline's shard assembler and PNG encoding, images/s on CPU")
    b.add_argument("--images", default="faces", choices=["faces", "noise"], help="what the 256x256 PNGs hold")
    b.add_argument("--count", type=count, default=4000)
    b.add_argument("--rows-per-shard", type=count, default=1000)
    b.add_argument("--batch-size", type=count, default=64, help="rows per batch handed to the assembler")
    b.add_argument("--output", help="where the shards go (local or s3://; default: a temporary folder)")
    for b in bench.choices.values():
        b.add_argument("--out", help="also write the result JSON here")
    p.set_defaults(run=_bench)

    from mdland.demo import DemoSize

    p = sub.add_parser("demo", parents=[common], help="run the pipeline on the embedded default and write a report")
    p.add_argument("--out", default="demo-report")
    p.add_argument("--storage", default="demo-data", help="local folder or s3://bucket/prefix for the data")
    p.add_argument("--train", type=count, default=DemoSize.train, help="procedural faces to learn from")
    p.add_argument("--test", type=count, default=DemoSize.test, help="held-out faces to evaluate on")
    p.add_argument("--steps", type=count, default=DemoSize.controlnet_steps, help="ControlNet training steps per stage")
    p.add_argument("--styles", type=count, default=DemoSize.styles, help="how many of the 25 styles to generate")
    p.add_argument("--images-per-style", type=count, default=DemoSize.images_per_style)
    p.add_argument("--epochs", type=count, default=DemoSize.detector_epochs, help="detector fine-tuning epochs")
    p.add_argument("--seed", type=int, default=DemoSize.seed)
    p.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        print(f"mdland {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (every write is atomic); a re-run resumes
        print(f"mdland {args.stage}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
