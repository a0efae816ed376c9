r"""What the ``stepdiff`` command does, one function per subcommand, callable from Python.

- {func}`train_run`: train a configuration ({mod}`stepdiff.config`) into a checkpoint, with a
  JSON-lines loss log beside it, resumable exactly; data-parallel under ``torchrun``.
- {func}`sample_images` / {func}`sample_run`: draw images from a checkpoint or a committed model
  with any sampler of {data}`stepdiff.samplers.SAMPLERS`, a class or a prompt, and classifier-free
  guidance; write a PNG grid and the tensors.
- {func}`evaluate_run`: the metrics of {func}`stepdiff.evaluation.evaluate_samples` over a sweep
  of guidance scales, written as JSON and stored in the checkpoint's record.
- {func}`export_run`: a checkpoint's EMA weights and record as a committed model.
- {func}`info`: versions, the device, whether the Triton kernels run, the committed models.
- {func}`bench_run`: the benchmark scripts of a checkout's ``benchmarks/`` folder.

The command line ({mod}`stepdiff.cli`) only parses arguments and calls these.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoints as ckpt
from .config import (
    autocast_dtype,
    build_data,
    build_model,
    build_objective,
    held_out_data,
    resolve,
    set_value,
)

__all__ = [
    "RunResult",
    "make_config",
    "train_run",
    "log_path",
    "replay",
    "sample_images",
    "sample_run",
    "save_grid",
    "evaluate_run",
    "default_classifier",
    "export_run",
    "info",
    "bench_run",
]


# --- train ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What {func}`train_run` did: the checkpoint (``None`` when a classifier run was stopped
    early), the losses of the steps it ran, and the record."""

    path: Path | None
    losses: list[float] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def make_config(config: str | Path | dict | None = None, overrides: list[str] | tuple = ()) -> dict:
    """A resolved configuration from a shipped name, a TOML path or a dict, with ``table.key=value``
    overrides applied (see {func}`stepdiff.config.set_value`)."""
    if config is None:
        raw: dict = {}
    elif isinstance(config, dict):
        raw = json.loads(json.dumps(config))  # a deep copy that also turns tuples into lists
    else:
        from .config import find_config, tomllib

        raw = tomllib.loads(find_config(config).read_text(encoding="utf-8"))
    for assignment in overrides:
        set_value(raw, assignment)
    named = config is not None and not isinstance(config, dict)
    return resolve(raw, source=str(config) if named else "the configuration")


def log_path(checkpoint: str | Path) -> Path:
    """The JSON-lines loss log beside a checkpoint: ``run.pt`` -> ``run.log.jsonl``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".log.jsonl")


class _Log:
    """One JSON line per step, ``{"step", "loss", "lr", "wall_s"}``; on resume the lines from the
    resumed step on are dropped first (a run stopped between checkpoints logged steps that are
    now run again). The file is created on the first line, so a run that fails at once leaves none."""

    def __init__(self, path: Path, start: int) -> None:
        self.path, self.file, self.t0 = path, None, time.perf_counter()
        if start > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < start]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif start == 0 and path.is_file():
            path.unlink()

    def __call__(self, step: int, loss: float, **extra: Any) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        line = {"step": step, "loss": loss, **extra, "wall_s": round(time.perf_counter() - self.t0, 3)}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _distributed_setup() -> tuple[int, int, torch.device, bool]:
    """``(world, rank, device, started)``: join the process group ``torchrun`` describes (gloo on
    the CPU, NCCL on GPUs) when ``WORLD_SIZE`` > 1; ``started`` says whether this call started it."""
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return world, rank, device, started


def train_run(
    config: str | Path | dict,
    out: str | Path,
    *,
    overrides: list[str] | tuple = (),
    resume: bool = False,
    stop_after: int | None = None,
    argv: list[str] | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> RunResult:
    """Train ``config`` (a shipped name, a TOML path or a dict; ``overrides`` as ``table.key=value``)
    into the checkpoint ``out``, with the loss log {func}`log_path` beside it.

    ``resume``: continue the run in ``out`` (its configuration must be the same). Without it an
    existing ``out`` is an error, never overwritten. ``stop_after``: stop after that many steps
    (the run keeps its length; resume later). ``argv``: the command line to record. Under
    ``torchrun`` (``WORLD_SIZE`` > 1) each process trains its shard (see {func}`stepdiff.train.train`)
    and rank 0 writes the files. ``device``: default CUDA when available, else the CPU.
    """
    cfg = make_config(config, overrides)
    out = Path(out)
    if resume and not out.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {out}")
    if not resume and out.exists():
        raise FileExistsError(f"{out} exists; pass resume=True (--resume) to continue it, or choose another path")
    if resume:
        stored = ckpt.read_checkpoint(out)["metadata"].get("config")
        if stored != cfg:
            differ = sorted(t for t in cfg if cfg.get(t) != (stored or {}).get(t))
            raise ValueError(f"cannot resume {out}: its configuration differs in {differ}")
    threads = cfg["train"]["threads"]
    if threads:
        torch.set_num_threads(threads)
    if cfg["kind"] == "classifier":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("classifier runs train in one process; run them without torchrun")
        if resume:
            raise ValueError("classifier runs are short and do not resume; train again into a new file")
        return _train_classifier(cfg, out, argv, stop_after, progress)
    world, rank, auto_device, started = _distributed_setup()
    device = torch.device(device) if device is not None else auto_device
    try:
        return _train_diffusion(cfg, out, resume, stop_after, argv, progress, device, world, rank)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _train_diffusion(cfg, out, resume, stop_after, argv, progress, device, world, rank) -> RunResult:
    """A diffusion run, or a run of one part of the text-to-image stack (kind clip, vae or
    autoencoder: the same loop with the part's own loss, then {func}`stepdiff.pipelines.finish_part`)."""
    from .config import ADAPTER_KINDS, PART_KINDS
    from .train import train

    data = build_data(cfg)
    model = build_model(cfg).to(device)
    images = data.images
    part = cfg["kind"] in PART_KINDS
    if part:
        from .pipelines import part_loss

        schedule, prediction, weighting, loss_fn = None, "eps", None, part_loss(cfg["kind"])
    elif cfg["kind"] in ADAPTER_KINDS:  # a ControlNet or a distilled student, on the base model of [base]
        from .config import adapter_training

        schedule, prediction, weighting = None, "eps", None
        images, loss_fn = adapter_training(cfg, model, data)
    elif cfg["kind"] == "inpaint":  # the masked-input model: the diffusion loss on random masks
        from .editing import masked_loss_fn

        schedule, prediction, weighting = build_objective(cfg)
        loss_fn = masked_loss_fn(schedule, prediction=prediction, weighting=weighting)
    else:
        from .config import latent_training_images

        schedule, prediction, weighting = build_objective(cfg)
        loss_fn = None
        images = latent_training_images(cfg, images)  # latent diffusion: the autoencoder's scaled latents
    t = cfg["train"]
    record = ckpt.provenance(cfg, argv, device=device, world_size=world)
    parts = {"latent": cfg["data"].get("latent"), "clip": cfg.get("model", {}).get("text", {}).get("clip")}
    if any(parts.values()):  # the frozen parts this run was built on, by their records' digests
        from .config import part_provenance

        record["parts"] = {k: part_provenance(v) for k, v in parts.items() if v}
    record["n_parameters"] = sum(p.numel() for p in model.parameters())
    start = ckpt.read_checkpoint(out)["step"] if resume else 0
    log = _Log(log_path(out), start) if rank == 0 else None
    losses: list[float] = []

    def on_step(k: int, loss: float) -> None:
        losses.append(loss)
        log(k, loss)

    try:
        result = train(
            model, images, schedule, loss_fn=loss_fn,
            prediction=prediction, weighting=weighting, labels=data.labels, label_dropout=t.get("label_dropout", 0.0),
            steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"], lr_warmup=t["lr_warmup"],
            lr_decay=t["lr_decay"], grad_clip=t["grad_clip"], ema_decay=t["ema_decay"], seed=t["seed"],
            micro_batches=t["micro_batches"], autocast=autocast_dtype(cfg), checkpoint=out,
            checkpoint_every=t["checkpoint_every"] or None, resume=out if resume else None, metadata=record,
            callback=on_step if rank == 0 else None, stop_after=stop_after, progress=progress,
        )
    except BaseException:
        if log is not None:
            log.close()
            if not out.exists() and log.path.exists():
                log.path.unlink()  # nothing was saved: leave nothing behind
        raise
    if log is not None:
        log.close()
    if part and rank == 0 and result.step == t["steps"]:
        record = _finish_part(cfg, out, data)
    return RunResult(out, losses if rank == 0 else result.losses[start:], record)


def _finish_part(cfg: dict, out: Path, data) -> dict:
    """Measure a finished part on its EMA weights (the autoencoder's latent scale, held-out scores)
    and store the result in the checkpoint: the buffers it set in both weight sets, the scores as
    the record's ``held_out``."""
    from .pipelines import finish_part

    state = ckpt.read_checkpoint(out)
    model = build_model(cfg)
    model.load_state_dict(state["ema"]["model"] if state.get("ema") is not None else state["model"])
    held = held_out_data(cfg)
    scores = finish_part(cfg["kind"], model, data.images, held.images, held.captions, seed=cfg["train"]["seed"])
    for name, buf in model.named_buffers():
        for weights in (state["model"], (state.get("ema") or {}).get("model")):
            if weights is not None:
                weights[name] = buf.detach().clone()
    state["metadata"] = dict(state["metadata"], held_out=scores)
    ckpt._atomic(out, lambda f: torch.save(state, f))
    return state["metadata"]


class _StopEarly(Exception):
    """Raised inside a classifier's loss to end a run after ``stop_after`` steps."""


def _train_classifier(cfg: dict, out: Path, argv, stop_after, progress) -> RunResult:
    from .classifiers import train_classifier

    data, held = build_data(cfg), held_out_data(cfg)
    shapes = cfg["data"]["name"] == "shapes"
    labels, held_labels = (data.targets, held.targets) if shapes else (data.labels, held.labels)
    model = build_model(cfg)
    t = cfg["train"]
    shift = t["shift"] if t["shift"] is not None else (1 if (cfg["data"]["size"] or 8) == 8 else 2)
    record = ckpt.provenance(cfg, argv)
    record["n_parameters"] = sum(p.numel() for p in model.parameters())
    log = _Log(log_path(out), 0) if stop_after is None else None
    losses: list[float] = []
    loss_of = model.loss

    # train_classifier logs the mean loss of every 100 steps; the record keeps every step's loss
    # (the provenance test compares them), so the model's loss is read here as it is computed.
    def recorded_loss(x: Tensor, y: Tensor) -> Tensor:
        value = loss_of(x, y)
        losses.append(float(value.detach()))
        if log is not None:
            log(len(losses) - 1, losses[-1])
        if stop_after is not None and len(losses) >= stop_after:
            raise _StopEarly
        return value

    model.loss = recorded_loss
    try:
        report = train_classifier(
            model, data.images, labels, held_out=(held.images, held_labels), steps=t["steps"],
            batch_size=t["batch_size"], lr=t["lr"], weight_decay=t["weight_decay"], shift=shift, noise=t["noise"],
            seed=t["seed"], progress=progress,
        )
    except _StopEarly:
        return RunResult(None, losses, record)
    except BaseException:
        if log is not None:
            log.close()
            if log.path.exists():
                log.path.unlink()
        raise
    finally:
        del model.loss
    log.close()
    record["held_out"] = dict(model.held_out)
    report_dict = report.as_dict()
    report_dict.pop("losses", None)
    record["report"] = report_dict
    state = {
        "model": model.state_dict(), "optimizer": None, "ema": None, "step": t["steps"],
        "losses": torch.tensor(losses, dtype=torch.float64), "settings": {}, "metadata": record,
        "elapsed": {"wall_s": report.wall_seconds, "cpu_s": report.cpu_seconds},
    }
    ckpt._atomic(out, lambda f: torch.save(state, f))
    return RunResult(out, losses, record)


def replay(record: dict, steps: int, folder: str | Path, *, threads: int | None = None) -> list[float]:
    r"""Re-run the first ``steps`` steps of a recorded run and return their losses (the provenance
    check of a committed model: they must equal ``record["losses_head"][:steps]``).

    The run is the record's configuration, trained into ``folder`` (a scratch folder) with
    ``stop_after=steps`` on ``threads`` intra-op threads (default: the recorded count, since the
    order of floating-point sums, and so the last bits, can depend on it). The caller's thread
    count is restored.
    """
    before = torch.get_num_threads()
    config = json.loads(json.dumps(record["config"]))
    config["train"]["threads"] = int(threads or record.get("threads") or before)
    try:
        return train_run(config, Path(folder) / "replay.pt", stop_after=steps).losses
    finally:
        torch.set_num_threads(before)


# --- sample -----------------------------------------------------------------------------------


def _conditioned(model: nn.Module) -> str:
    from .models import TextConditioned

    if isinstance(model, TextConditioned):
        return "text"
    return "class" if getattr(model, "null_class", None) is not None else "none"


def _check_guidance(w: float, rescale: float, interval) -> None:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
        raise ValueError(f"the guidance scale w must be a number >= 0; got {w!r}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"the guidance rescale must lie in [0, 1]; got {rescale!r}")
    if interval and (len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0):
        raise ValueError(f"the guidance interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1; got {interval!r}")


def sample_images(
    model: nn.Module,
    config: dict,
    n: int,
    *,
    labels: Tensor | None = None,
    prompts: list[str] | None = None,
    guidance: float = 1.0,
    rescale: float = 0.0,
    interval: tuple[float, float] | list | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    t_max: float | None = None,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
) -> Tensor:
    r"""``n`` images ``[n, C, H, W]`` from a trained diffusion model (float32, not clipped).

    The conditions: class ids ``labels`` ``[n]`` for a class-conditional model, or ``prompts`` (``n``
    strings, tokenized with {class}`stepdiff.text.Tokenizer`; for a layout-grounded model each prompt is
    first given every object a cell by {func}`stepdiff.shapes.locate_captions` from ``(seed, i)``) for a
    text-conditioned one; without
    them a conditional model samples unconditionally (its null condition). ``guidance`` $w \ge 0$,
    ``rescale`` and ``interval`` go to {class}`stepdiff.guidance.ClassifierFreeGuidance`. The sampler,
    its number of steps, the grid spacing and the first time default to the configuration's
    ``[sample]`` table. The start is $x_{t_0} = \sigma(t_0)\,z$ with all of $z$ drawn from ``seed``
    at once, so the images do not depend on ``batch_size``; a stochastic sampler's noise is seeded
    per batch from ``(seed, batch index)``. A latent diffusion model (``[data] latent``) samples
    latents and returns their decodings $D(z_0/s)$ by its autoencoder.
    """
    from .guidance import ClassifierFreeGuidance
    from .samplers import SAMPLERS, sample
    from .schedules import time_grid
    from .train import derive_seed

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of images must be a positive integer; got {n!r}")
    s = config["sample"]
    sampler = sampler or s["sampler"]
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    interval = interval if interval is not None else (s["interval"] or None)
    _check_guidance(guidance, rescale, interval)
    kind = _conditioned(model)
    cond = None
    if labels is not None:
        if kind != "class":
            raise ValueError(f"a class was given, but this model is conditioned on {kind!r}")
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"labels has {labels.shape[0]} entries for {n} images")
        if int(labels.min()) < 0 or int(labels.max()) >= model.null_class:
            raise ValueError(f"class ids must lie in 0..{model.null_class - 1}; got {labels.unique().tolist()}")
        cond = labels
    if prompts is not None:
        if kind != "text":
            raise ValueError(f"a prompt was given, but this model is conditioned on {kind!r}")
        from .text import Tokenizer

        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images")
        if getattr(model, "layout", None) is not None:
            # A layout-grounded model reads each object's place from the caption: plan the places
            # the prompt leaves open (seeded, one draw per image) before tokenizing.
            from .shapes import locate_captions

            prompts = locate_captions(prompts, seed)
        cond = Tokenizer().encode(list(prompts))
    if guidance != 1.0 and cond is None:
        raise ValueError(
            f"guidance w = {guidance} needs a condition (a class or a prompt) of a conditional model"
            if kind != "none" else f"guidance w = {guidance} needs a conditional model; this one is unconditional"
        )
    schedule, prediction, _ = build_objective(config)
    t_max = s["t_max"] if t_max is None else t_max
    ts = time_grid(steps or s["steps"], spacing or s["spacing"], schedule, t_max=t_max)
    shape = _image_shape(config)
    device = next(model.parameters()).device
    decoder = None
    if config["data"].get("latent"):  # latent diffusion: sample latents, decode them to images
        from .config import load_part

        decoder = load_part(config["data"]["latent"], "autoencoder", "[data] latent").to(device)
    g = torch.Generator().manual_seed(int(seed))
    start = float(schedule.sigma(torch.tensor(float(ts[0]), dtype=torch.float64))) * torch.randn(
        (n, *shape), generator=g)
    takes_generator = "generator" in inspect.signature(SAMPLERS[sampler]).parameters
    model.eval()
    out = []
    with torch.inference_mode():
        for i, lo in enumerate(range(0, n, batch_size)):
            x = start[lo : lo + batch_size].to(device)
            net = model
            if cond is not None:
                net = ClassifierFreeGuidance(model, float(guidance), y=cond[lo : lo + batch_size].to(device),
                                             rescale=rescale, prediction=prediction, schedule=schedule,
                                             interval=tuple(interval) if interval else None)
            kw = {"prediction": prediction, "progress": progress}
            if takes_generator:
                kw["generator"] = torch.Generator(device=device).manual_seed(derive_seed(seed, 2, i))
            x0 = sample(sampler, net, x, schedule, ts, **kw)
            if decoder is not None:
                x0 = decoder.decode_latents(x0.float())
            out.append(x0.float().cpu())
    return torch.cat(out)


def save_grid(images: Tensor, path: str | Path, *, nrow: int | None = None, scale: int | None = None) -> Path:
    r"""Write images ``[n, C, H, W]`` in $[-1, 1]$ as one PNG grid (``nrow`` per row, each pixel
    ``scale`` times enlarged; defaults: a square-ish grid, cells at least 32 pixels), atomically.
    The grid is the canvas of {func}`stepdiff.figures.image_grid`, each $u \in [0, 1]$ stored as
    the byte $\mathrm{round}(255\,u)$."""
    from PIL import Image

    from .figures import image_grid

    canvas = image_grid(images, nrow)  # checks the shape and nrow
    H, W = images.shape[-2:]
    scale = scale or max(1, 32 // max(H, W))
    pixels = (canvas * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(pixels[..., 0] if canvas.shape[-1] == 1 else pixels)  # uint8: grey (L) or RGB
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return ckpt._atomic(Path(path), lambda f: img.save(f, format="PNG"))


def _load_generator(source: str | Path) -> tuple[nn.Module, dict, dict]:
    model, record = ckpt.load(source)
    if record.get("kind") != "diffusion":
        raise ValueError(f"{source} is a {record.get('kind')} model, not a diffusion model")
    return model, record, resolve(record["config"], source=str(source))


def _image_shape(cfg: dict) -> tuple[int, int, int]:
    """What the model denoises: the images' shape, or with ``[data] latent`` the latents'."""
    from .config import sample_shape

    return sample_shape(cfg)


def _class_id(value: str | int, classes: list[str] | None, n_classes: int) -> int:
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if classes and value in classes:
            return classes.index(value)
        raise ValueError(f"unknown class {value!r}; the classes are {classes or list(range(n_classes))}")
    k = int(value)
    if not 0 <= k < n_classes:
        raise ValueError(f"class {k} out of range: the model has classes 0..{n_classes - 1}")
    return k


def sample_run(
    source: str | Path,
    out: str | Path,
    *,
    n: int = 16,
    label: str | int | None = None,
    prompt: str | None = None,
    guidance: float | None = None,
    rescale: float | None = None,
    interval: tuple[float, float] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    seed: int = 0,
    nrow: int | None = None,
    progress: bool = False,
) -> dict:
    """Sample ``n`` images from a checkpoint or committed model and write ``out`` (a PNG grid) and
    ``out`` with ``.pt`` (``{"images", "labels" or "prompts", "settings"}``). A class-conditional
    model without ``label`` cycles through its classes; ``guidance`` defaults to the model's
    ``[sample] guidance`` when a condition is given. Returns the settings used."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"the output is a PNG file (name ending in .png); got {out}")
    s_guidance = guidance
    if guidance is not None or rescale is not None or interval is not None:
        _check_guidance(guidance if guidance is not None else 1.0, rescale or 0.0, interval)
    if prompt is not None:
        from .text import Tokenizer

        Tokenizer().encode([prompt])  # a prompt with no known word fails before any work
    model, record, cfg = _load_generator(source)
    kind = _conditioned(model)
    labels = prompts = None
    if kind == "class":
        n_classes = model.null_class
        classes = _class_names(cfg)
        labels = (torch.full((n,), _class_id(label, classes, n_classes), dtype=torch.long) if label is not None
                  else torch.arange(n) % n_classes)
        if label is None and nrow is None:
            nrow = n_classes if n >= n_classes else None
    elif label is not None:
        raise ValueError(f"--class needs a class-conditional model; {source} is conditioned on {kind!r}")
    if prompt is not None:
        if kind != "text":
            raise ValueError(f"--prompt needs a text-conditioned model; {source} is conditioned on {kind!r}")
        prompts = [prompt] * n
    if s_guidance is None:
        s_guidance = cfg["sample"]["guidance"] if (labels is not None or prompts is not None) else 1.0
    settings = {
        "model": str(source), "n": n, "sampler": sampler or cfg["sample"]["sampler"],
        "steps": steps or cfg["sample"]["steps"], "spacing": spacing or cfg["sample"]["spacing"],
        "guidance": s_guidance, "rescale": rescale or 0.0, "interval": list(interval) if interval else None,
        "seed": seed, "class": None if labels is None else labels.tolist(), "prompt": prompt,
    }
    images = sample_images(model, cfg, n, labels=labels, prompts=prompts, guidance=s_guidance, rescale=rescale or 0.0,
                           interval=interval, sampler=sampler, steps=steps, spacing=spacing, seed=seed,
                           progress=progress)
    tensors = out.with_suffix(".pt")
    ckpt._atomic(tensors, lambda f: torch.save({"images": images, "labels": labels, "prompts": prompts,
                                                "settings": settings}, f))
    save_grid(images, out, nrow=nrow)
    return settings


def _class_names(cfg: dict) -> list[str] | None:
    name = cfg["data"]["name"]
    if name == "digits":
        return [str(c) for c in range(10)]
    if name == "shapes":
        from .shapes import SHAPES

        return list(SHAPES)
    if name in ("mnist",):
        from .image_data import MNIST_CLASSES

        return list(MNIST_CLASSES)
    if name == "fashion-mnist":
        from .image_data import FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES)
    if name == "cifar10":
        from .image_data import CIFAR10_CLASSES

        return list(CIFAR10_CLASSES)
    return None


# --- evaluate ---------------------------------------------------------------------------------


def default_classifier(cfg: dict) -> str:
    """The committed classifier that judges a configuration's data: ``digits8-classifier``,
    ``digits16-classifier`` or ``shapes-classifier``."""
    name = cfg["data"]["name"]
    if name == "digits":
        return f"digits{cfg['data']['size'] or 8}-classifier"
    if name == "shapes":
        return "shapes-classifier"
    raise ValueError(f"no committed classifier judges [data] name = {name!r}; pass one (--classifier PATH)")


def _summary(report: dict) -> dict:
    """The headline numbers of one evaluate_samples report."""
    out = {
        "frechet": report["frechet"]["value"],
        "frechet_floor": report["frechet_floor"]["value"],
        "frechet_ratio": report["frechet_ratio"],
        "precision": report["precision_recall"]["precision"],
        "recall": report["precision_recall"]["recall"],
    }
    if "accuracy" in report:
        out["accuracy"] = report["accuracy"]["accuracy"]
    if "scenes" in report:
        sc = report["scenes"]
        out["all_correct"] = sc["all_correct"]
        for k, v in sc["by_n_objects"].items():
            out[f"all_correct_{k}_object{'s' if int(k) > 1 else ''}"] = v["all_correct"]
        out["errors"] = sc["errors"]
    return out


def evaluate_run(
    source: str | Path,
    out: str | Path | None = None,
    *,
    classifier: str | Path | None = None,
    n: int | None = None,
    guidance: list[float] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    seed: int | None = None,
    store: bool = True,
    progress: bool = False,
) -> dict:
    r"""Evaluate a diffusion checkpoint or committed model: sample ``n`` images at each guidance
    scale of ``guidance`` (the curve, not a point; $w = 0$ is the unconditional model) and measure
    them with {func}`stepdiff.evaluation.evaluate_samples` in the ``classifier``'s features.

    Conditions: a class-conditional model is asked for every class equally often; a text model for
    the captions of the held-out scenes (so single- and multi-object prompts in the training
    mixture, reported by object count, with the errors by kind); an unconditional model has one
    point. The Fréchet distance is against held-out images, beside the floor (training vs
    held-out at the same counts). Returns the report; writes it to ``out`` (JSON) when given, and
    with ``store`` into the checkpoint's record (or the exported model's JSON) when ``source`` is a
    file.
    """
    from .evaluation import evaluate_samples
    from .shapes import parse_caption

    model, record, cfg = _load_generator(source)
    e = cfg["evaluate"]
    n = n or e["n"]
    seed = e["seed"] if seed is None else seed
    kind = _conditioned(model)
    ws = list(guidance) if guidance else (list(e["guidance"]) or [0.0, cfg["sample"]["guidance"]])
    for w in ws:
        _check_guidance(w, 0.0, None)
    clf_source = classifier or e["classifier"] or default_classifier(cfg)
    judge, judge_record = ckpt.load(clf_source)
    if judge_record.get("kind") != "classifier":
        raise ValueError(f"{clf_source} is not a classifier")
    held, train_data = held_out_data(cfg), build_data(cfg)
    if train_data.images.shape[0] < n:
        raise ValueError(f"n = {n} samples but only {train_data.images.shape[0]} training images for the floor")
    labels = prompts = asked = None
    if kind == "class":
        labels = torch.arange(n) % model.null_class
        asked = labels
    elif kind == "text":
        if held.captions is None:
            raise ValueError("a text-conditioned model needs captioned held-out data (shapes)")
        prompts = [held.captions[i % len(held.captions)] for i in range(n)]
        asked = [parse_caption(c) for c in prompts]
    else:
        ws = [1.0]
    points = []
    for w in ws:
        t0 = time.perf_counter()
        images = sample_images(model, cfg, n, labels=labels, prompts=prompts, guidance=float(w), sampler=sampler,
                               steps=steps, spacing=spacing, seed=seed, batch_size=e["batch_size"], progress=progress)
        full = evaluate_samples(judge, images, held_out=held.images, train=train_data.images,
                                asked=asked, seed=seed)
        points.append({"w": float(w) if kind != "none" else None, **_summary(full), "sample_wall_s":
                       round(time.perf_counter() - t0, 2), "report": full})
    report = {
        "model": str(source),
        "name": record.get("name"),
        "condition": kind,
        "classifier": {"source": str(clf_source), "name": judge_record.get("name"),
                       "held_out": judge_record.get("held_out")},
        "n_samples": n,
        "n_held_out": int(held.images.shape[0]),
        "seed": seed,
        "sampler": {"name": sampler or cfg["sample"]["sampler"], "steps": steps or cfg["sample"]["steps"],
                    "spacing": spacing or cfg["sample"]["spacing"]},
        "sweep": points,
    }
    if out is not None:
        ckpt.write_json(out, report)
    if store and Path(source).exists():
        ckpt.add_metrics(source, report)
    return report


# --- export, info, bench ----------------------------------------------------------------------


def export_run(checkpoint: str | Path, directory: str | Path | None = None, name: str | None = None, *,
               dtype: str | None = None) -> tuple[Path, Path]:
    """Export a checkpoint as a committed model ({func}`stepdiff.checkpoints.export`): into
    ``directory`` (default: the package's ``weights/`` folder), float16 for a generator and
    float32 for a classifier unless ``dtype`` says otherwise."""
    from . import pretrained

    record = ckpt.record_of(ckpt.read_checkpoint(checkpoint))
    dtype = dtype or ("float32" if record.get("kind") == "classifier" else "float16")
    return ckpt.export(checkpoint, directory or pretrained.weights_dir(), name, dtype=dtype)


def info() -> dict:
    """Versions, the device, whether the Triton kernels are active, the configurations and the
    committed models."""
    import importlib.metadata as md
    import importlib.util
    import platform

    from . import __version__, pretrained
    from .config import config_names
    from .kernels.fused import resolve_backend

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    probe = torch.empty(1, device=device)
    backend = resolve_backend(probe)
    if backend == "triton":
        kernels = f"active: the Triton kernels run on {ckpt.device_description(device)}"
    elif importlib.util.find_spec("triton") is None:
        kernels = "inactive: Triton is not installed; every function runs its PyTorch reference"
    elif os.environ.get("STEPDIFF_BACKEND") == "torch":
        kernels = "inactive: STEPDIFF_BACKEND=torch asks for the PyTorch references"
    else:
        kernels = ("inactive: no CUDA device; the PyTorch references run (Triton's interpreter only "
                   "with backend='triton' and TRITON_INTERPRET=1, for tests)")
    models = []
    for name in pretrained.available():
        rec = pretrained.record(name)
        models.append({"name": name, "kind": rec.get("kind"),
                       "parameters": (rec.get("weights") or {}).get("parameters"), "trained_steps": rec.get("step"),
                       "cpu_s": rec.get("cpu_s"), "device": rec.get("device"), "evaluated": "metrics" in rec})
    git = ckpt.git_commit()
    return {
        "stepdiff": __version__,
        "commit": git["commit"],
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "triton": version("triton"),
        "numpy": version("numpy"),
        "device": ckpt.device_description(device),
        "cuda": cuda,
        "threads": torch.get_num_threads(),
        "triton_kernels": kernels,
        "configs": config_names(),
        "committed_models": models,
    }


def _benchmarks_dir() -> Path | None:
    """The ``benchmarks/`` folder of the checkout holding the package (none in an installed copy)."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    return folder if folder.is_dir() else None


# Arguments that keep a benchmark short and its results file untouched; scripts not listed get
# --quick and --no-write when they accept them.
_BENCH_ARGS = {"host_cost.py": ["--calls", "200", "--repeats", "3"]}


def bench_run(names: list[str] | None = None, *, full: bool = False, write: bool = False,
              timeout: float = 1800.0, echo: bool = True) -> list[dict]:
    """Run the benchmark scripts of the checkout's ``benchmarks/`` folder (``bench_*.py`` and
    ``host_cost.py``; ``names`` picks some, e.g. ``["models", "fused"]``), each in its own process,
    short (``--quick``) unless ``full``, without touching the results files unless ``write``.

    A script that needs a GPU on a machine without one exits with its reason, reported as
    skipped. Returns one entry per script: ``name``, ``status`` (``ran``, ``skipped``,
    ``failed``, ``timeout``), ``seconds`` and the last lines of its output (each script prints
    its own table, echoed as it runs when ``echo``).
    """
    folder = _benchmarks_dir()
    if folder is None:
        raise FileNotFoundError("no benchmarks/ folder beside the package: `stepdiff bench` runs from a checkout")
    scripts = sorted(folder.glob("bench_*.py")) + sorted(folder.glob("host_cost.py"))
    short = {p.stem.removeprefix("bench_"): p for p in scripts}
    if names:
        unknown = sorted(set(names) - set(short))
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; choose from {sorted(short)}")
        scripts = [short[k] for k in names]
    results = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder.parent), os.environ.get("PYTHONPATH")])))
    for script in scripts:
        source = script.read_text(encoding="utf-8")
        args = [] if full else list(_BENCH_ARGS.get(script.name, ["--quick"] if '"--quick"' in source else []))
        if not write and '"--no-write"' in source:
            args.append("--no-write")
        if not write and script.name == "host_cost.py":
            args += ["--out", os.devnull]
        name = script.stem.removeprefix("bench_")
        if echo:
            print(f"== {name}: {script.name} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(script), *args], cwd=folder.parent, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results.append({"name": name, "status": "timeout", "seconds": timeout, "output": ""})
            continue
        output = (proc.stdout + proc.stderr).strip()
        if echo and output:
            print(output, flush=True)
        needs_gpu = not torch.cuda.is_available() and "cuda" in output.lower()
        status = "ran" if proc.returncode == 0 else ("skipped" if needs_gpu else "failed")
        results.append({"name": name, "status": status, "seconds": round(time.perf_counter() - t0, 1),
                        "returncode": proc.returncode, "output": "\n".join(output.splitlines()[-5:])})
    return results

