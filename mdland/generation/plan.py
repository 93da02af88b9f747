"""The generation plan and its CPU stage.

The plan is a pure function of the config: sample `i` gets style `i mod S` (so any prefix is balanced across
styles), a source landmark row and a seed drawn from `(seed, i)` alone. Shard `k` holds samples
`[k * rows_per_shard, (k + 1) * rows_per_shard)`, so a shard's name says which samples it holds and a re-run can
skip the shards already written.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from mdland.data import storage
from mdland.data.shards import first_image_size, landmarks_array, landmarks_from_rows, read_columns
from mdland.landmarks.align import resize_points
from mdland.landmarks.edits import fit_in_frame, sample_edits
from mdland.landmarks.render import render_landmarks

DEFAULT_STYLES = str(Path(__file__).with_name("styles.yaml"))
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


# Raised whenever the sampler's output for a planned sample changes, so a folder of older samples is not resumed.
SAMPLER_VERSION = 4  # 4: half-precision noise drawn in fp32


@dataclass
class GenerateConfig:
    source: list[str] = field(default_factory=list)  # shard datasets whose landmark sets are edited (local or s3://)
    output: str = ""  # where shards + manifest.json go (local or s3://)
    model: str = "tiny"  # SD 1.x: a preset or a diffusers-format directory
    controlnet: str = ""  # the stage-2 ControlNet export
    styles_file: str = DEFAULT_STYLES
    styles: list[str] = field(default_factory=list)  # a subset of the file's style names; empty: all
    images_per_style: int = 400
    seed: int = 0
    resolution: int = 256
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    edits_per_sample: int = 2
    edit_strength: float = 1.0  # 1: the edits' full ranges; above 1 extrapolates them
    rows_per_shard: int = 1000
    batch_size: int = 64  # images per sampler call
    num_actors: int = 1  # generation actors (one model each; one GPU each with use_gpu)
    num_assemblers: int | None = None  # shard writers; None: one per 16 generation actors
    use_gpu: bool = False
    cpus_per_actor: float = 0.5
    dtype: str = "float16"  # on GPU: float16 or bfloat16 (always float32 on CPU)
    channels_last: bool = False  # slower on an H100 (fp16, sd15, batch 64: 1.74 vs 1.56 s per 10 steps)
    compile: bool = False  # torch.compile the UNet and ControlNet (GPU)
    compile_mode: str | None = None  # with compile: torch.compile's mode (e.g. max-autotune); None: its default
    fuse_qkv: bool = True  # fused q/k/v projections in the UNet's attention layers (GPU)
    vae_batch_size: int = 16
    max_shards: int | None = None  # stop after this many new shards (for trial runs)
    detector: str | None = None  # a detector checkpoint: score each image by its NME against its landmarks
    min_alignment: float | None = None  # with a detector: drop pairs whose NME is above this

    @property
    def total(self) -> int:
        return len(load_styles(self.styles_file, self.styles)) * self.images_per_style

    @property
    def num_shards(self) -> int:
        return -(-self.total // self.rows_per_shard)

    def plan_identity(self) -> dict:
        """What fixes the planned set: two runs agreeing on these write the same samples."""
        keys = ("source", "model", "controlnet", "images_per_style", "seed", "resolution", "num_inference_steps",
                "guidance_scale", "eta", "edits_per_sample", "edit_strength", "rows_per_shard", "detector",
                "min_alignment")
        ident = {k: getattr(self, k) for k in keys}
        ident["style_prompts"] = load_styles(self.styles_file, self.styles)  # what the styles file says, not its path
        ident["sampler"] = SAMPLER_VERSION
        ident["precision"] = self.dtype if self.use_gpu else "float32"  # fp16, bf16 and fp32 draw other images
        # Paths alone do not name weights or data: a run that goes on re-publishes its export at the same path, and
        # a re-ingested source would give the planned rows other landmark sets.
        from mdland.diffusion.models import PRESETS

        ident["weights"] = {k: storage.fingerprint(getattr(self, k))
                            for k in ("model", "controlnet", "detector")
                            if getattr(self, k) and getattr(self, k) not in PRESETS}
        if self.source:
            ident["weights"]["source"] = [storage.fingerprint(s) for s in self.source]
        return ident


def load_styles(path: str, subset: list[str] | None = None) -> list[dict]:
    """[{"name", "prompt"}, ...] from a styles YAML, optionally only the named ones (in the file's order)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: styles file not found")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from None
    styles = data.get("styles") if isinstance(data, dict) else None
    if not isinstance(styles, list) or not styles:
        raise ValueError(f"{path}: expected a non-empty `styles:` list")
    for i, s in enumerate(styles):
        if not isinstance(s, dict) or not s.get("name") or not s.get("prompt"):
            raise ValueError(f"{path}: style {i} needs a name and a prompt")
    if subset:
        names = {s["name"] for s in styles}
        unknown = [n for n in subset if n not in names]
        if unknown:
            raise ValueError(f"{path}: unknown style(s) {unknown}")
        styles = [s for s in styles if s["name"] in subset]
    return styles


def source_landmarks(cfg: GenerateConfig) -> np.ndarray:
    """The source datasets' landmark sets, in output pixels, one after another in `source` order: (N, 68, 2)."""
    sets = []
    for source in cfg.source:
        table = read_columns(source, ["landmarks"])
        if table.num_rows == 0:
            raise ValueError(f"source: {source} is an empty dataset")
        size = first_image_size(source)  # each dataset at its own size
        sets.append(resize_points(landmarks_array(table), size, (cfg.resolution, cfg.resolution)))
    return np.concatenate(sets)


def plan_sample(seed: int, index: int, num_styles: int, num_source: int) -> tuple[int, int, int]:
    """(style index, source row, sample seed) of sample `index`."""
    rng = np.random.default_rng([seed, index])
    return index % num_styles, int(rng.integers(num_source)), int(rng.integers(2**63 - 1))


def shard_rows(cfg: GenerateConfig, shard: int, styles: list[dict], landmarks: np.ndarray) -> list[dict]:
    """The first CPU stage for one shard: plan its samples and edit their landmarks (`render_conditions` draws
    them)."""
    start = shard * cfg.rows_per_shard
    stop = min(start + cfg.rows_per_shard, len(styles) * cfg.images_per_style)
    rows = []
    for index in range(start, stop):
        style, source_row, seed = plan_sample(cfg.seed, index, len(styles), len(landmarks))
        points, records = sample_edits(landmarks[source_row], np.random.default_rng(seed), cfg.edits_per_sample,
                                       cfg.edit_strength)
        points = fit_in_frame(points, cfg.resolution)
        rows.append({
            "index": index, "shard": shard, "key": f"synthetic-{cfg.seed}-{index:09d}", "source_row": source_row,
            "style": styles[style]["name"], "prompt": styles[style]["prompt"], "seed": seed,
            # comma-joined so Ray Data keeps the column as plain strings
            "edits": ",".join(r["name"] for r in records), "edit_params": json.dumps(records),
            "landmarks": points.astype(np.float32),
        })
    return rows


def render_conditions(batch: dict, resolution: int) -> dict:
    """The second CPU stage: each planned row's condition image, drawn from its edited landmarks."""
    conditions = [render_landmarks(p, resolution) for p in landmarks_from_rows(batch["landmarks"])]
    return {**batch, "condition": np.stack(conditions)}
