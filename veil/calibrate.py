"""Calibration: learn one noise profile per alpha, and a tail that reads it, head frozen.

loss = (1 - alpha) * task_weight * task + alpha * leakage

``leakage`` (default ``channel``) is the Gaussian-channel bound on what one element of the
activation tells an attacker who knows the noise: ``mean_i 0.5 * log(1 + var_i / sigma_i^2)``
nats, with ``var_i`` the clean activation's variance over the footage (per channel: faces can
be anywhere, see the random shifts below). Unlike ``-log mean sigma`` (kept as ``log_sigma``),
it stops rewarding noise on elements that are already drowned and pushes it where the signal
still shows. With ``tune_tail`` (default) the tail is fine-tuned jointly with the noise, so
that much stronger noise still keeps the accuracy: every published defence that makes
reconstructions unrecognisable trains part of the network. The head never changes.

With ``adversary_weight`` above 0 the loss also adds ``alpha * adversary_weight`` times the
advantage of an inversion decoder trained alongside (:mod:`veil.adversary`); measured on the
default detector at alpha 0.95 it cost AP (0.973 -> 0.948 kept) without moving identity, so it
is off by default.

``task`` is either agreement with the clean model's own outputs on the user's footage
(``distill``, the default: operators calibrate on their own cameras and have no labels) or the
detector's multibox loss against ground-truth boxes (``multibox``). Where the cut changed the
network (RetinaFace's deep split, :meth:`SplitDetector.reference`), the clean model is the
whole network, not the split: the tuned tail then wins back what the cut cost (measured: clean
FDDB 0.9370 -> 0.9504, against the whole network's 0.9612).

Speed: the head is frozen, so the activations of the calibration images never change. They
are computed once and reused for every alpha and epoch; each step only runs the tail forward
and backward. Resumable: finished alphas are skipped, and an interrupted alpha
continues from its last finished epoch. Deterministic under a seed: the shuffling and the noise
of epoch ``e`` for alpha ``a`` come from a generator seeded by (seed, a, e) alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from veil.adversary import Adversary, letterboxed_targets
from veil.detectors.base import Frame, InputGeometry, Letterbox, SplitDetector
from veil.errors import ConfigError, DatasetError
from veil.eval import read_image
from veil.noise import NoiseLayer
from veil.profiles import NoiseProfile, ProfileBank, ProfileMeta, check_alpha, profile_from_layer

DEFAULT_ALPHAS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
BoxArray = np.ndarray[Any, np.dtype[np.float32]]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

TaskLoss = Literal["distill", "multibox"]
LeakageLoss = Literal["channel", "log_sigma"]


# Per-detector settings measured on FDDB (README, "How the calibration defaults were chosen").
# The deep splits (FaceBoxes after its Inception blocks, RetinaFace after MobileNet stage 2)
# with a tuned tail tolerate much stronger noise, so the task term is weighted less and
# training starts from 1 activation std of noise.
_DEEP_SPLIT = {"task_weight": 5.0, "initial_sigma_ratio": 1.0, "epochs": 8}
DETECTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "faceboxes": _DEEP_SPLIT,
    "retinaface": _DEEP_SPLIT,
    # RetinaFace's stride-8 activation tolerates less: weight 5 kept only 0.80-0.91 of AP.
    "retinaface-stage1": {"initial_sigma_ratio": 0.5, "epochs": 6},
}


def config_for(detector_name: str, **overrides: Any) -> CalibrationConfig:
    """The calibration settings for a detector: its measured defaults, then ``overrides``
    (those given as None are left to the defaults)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return CalibrationConfig(**(DETECTOR_DEFAULTS.get(detector_name, {}) | given))


@dataclass(frozen=True)
class CalibrationConfig:
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    geometry: InputGeometry | None = None  # default: the detector's default geometry
    task: TaskLoss = "distill"
    epochs: int = 5
    batch_size: int = 8
    lr: float = 0.05
    seed: int = 0
    # Noise bounds in units of the clean activations' standard deviation over the images.
    sigma_min_ratio: float = 0.0
    sigma_max_ratio: float = 10.0
    initial_sigma_ratio: float = 0.25
    # Scale of the task term against -log mean sigma. The distillation loss is per expected
    # face while the noise term averages over every activation element; without a scale the
    # noise term wins at every alpha above ~0.2 (measured: alpha 0.8 kept 0.58 of clean AP).
    task_weight: float = 30.0
    # Shift each batch's activations by a random offset (circularly) before the noise: faces
    # can be anywhere in a frame, and without it a per-element profile learns low noise only
    # where the calibration images happened to have faces (measured: a learned alpha 0.2
    # profile kept 0.92 of clean AP where uniform noise of more strength kept 0.96).
    augment_shifts: bool = True
    # mu is per element too and overfits at the scale's learning rate.
    mu_lr_factor: float = 0.1
    leakage: LeakageLoss = "channel"
    # Fine-tune the tail with the noise (one tail per profile), at this Adam learning rate.
    tune_tail: bool = True
    # 1e-4: measured on FaceBoxes under 1.5 std of noise, 160 images, 4 epochs: AP 0.747
    # against the frozen tail's 0.693; 3e-4 overfit (0.626) and so did 12 epochs of 64 images.
    tail_lr: float = 1e-4
    # Distil from the whole network where the split changed it (SplitDetector.reference).
    reference_teacher: bool = True
    # Train against an inversion decoder learning alongside (veil.adversary): the weight of
    # its advantage over the no-information guess, beside the leakage term; 0 turns it off.
    adversary_weight: float = 0.0
    adversary_lr: float = 1e-3

    def __post_init__(self) -> None:
        if not self.alphas:
            raise ConfigError("calibration needs at least one alpha")
        for a in self.alphas:
            check_alpha(a)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs and batch_size must be >= 1 and lr > 0")
        if not 0 <= self.sigma_min_ratio < self.sigma_max_ratio:
            raise ConfigError("need 0 <= sigma_min_ratio < sigma_max_ratio")
        if self.task not in ("distill", "multibox"):
            raise ConfigError(f"task loss must be 'distill' or 'multibox', got {self.task!r}")
        if self.leakage not in ("channel", "log_sigma"):
            raise ConfigError(f"leakage must be 'channel' or 'log_sigma', got {self.leakage!r}")
        if self.tail_lr <= 0:
            raise ConfigError("tail_lr must be > 0")
        if self.adversary_weight < 0 or self.adversary_lr <= 0:
            raise ConfigError("adversary_weight must be >= 0 and adversary_lr > 0")


@dataclass
class CalibrationSet:
    """The calibration images, reduced to what training needs."""

    activations: Tensor  # [N, C, H, W] clean head outputs
    teacher: list[Tensor]  # clean raw outputs of the teacher, for distillation without shifts
    targets: list[Tensor] | None  # per image [K, 4] xyxy boxes normalised to the input
    input_height: int
    input_width: int
    description: dict[str, Any] = field(default_factory=dict)
    # The reference network's head outputs [N, C', kH, kW], when the teacher is the reference.
    reference: Tensor | None = None
    # The letterboxed images at 4x the activation's grid (veil.adversary), when kept.
    pixels: Tensor | None = None


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"calibration images: {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"calibration images: no .jpg/.png images under {folder}")
    return paths[:limit] if limit else paths


def video_frames(path: Path, every: int = 5, limit: int | None = None) -> list[Frame]:
    """Every ``every``-th frame of a video file, BGR; for calibrating on a camera's footage."""
    import av

    frames: list[Frame] = []
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % every == 0:
                    frames.append(np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8))
                    if limit and len(frames) >= limit:
                        break
    except (av.error.FFmpegError, OSError) as exc:
        raise DatasetError(f"calibration video {path}: cannot decode ({exc})") from exc
    if not frames:
        raise DatasetError(f"calibration video {path}: no frames decoded")
    return frames


@torch.no_grad()
def prepare(
    detector: SplitDetector,
    images: Sequence[Path | Frame],
    geometry: InputGeometry,
    boxes: Sequence[BoxArray] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    teacher: bool = True,
    reference: SplitDetector | None = None,
    pixels: bool = False,
) -> CalibrationSet:
    """Run the frozen head (and, with ``teacher``, the clean teacher) once over the images.

    ``boxes``: per image, ground-truth ``[K, 4]`` xyxy in image pixels (for ``multibox``).
    The clean outputs are only needed by distillation without random shifts; shifted
    batches get their teacher from the shifted activations during training. With
    ``reference`` (the whole network), the teacher is the reference, and its head outputs are
    kept too, to be shifted alike. ``pixels``: keep the letterboxed images too, at 4x the
    activation's grid (what :mod:`veil.adversary`'s decoder rebuilds).
    """
    detector.check_geometry(geometry)
    parts = _Prepared()
    digest = hashlib.sha256()
    bar = tqdm(total=len(images), desc="clean activations", disable=not progress, unit="img")
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x, letterboxes = detector.preprocess(_read_frames(chunk, digest), geometry)
        parts.add(detector, x, reference, teacher=teacher, pixels=pixels)
        if boxes is not None:
            parts.targets += _normalised_boxes(
                boxes[start : start + len(chunk)], letterboxes, geometry
            )
        bar.update(len(chunk))
    bar.close()
    return CalibrationSet(
        activations=torch.cat(parts.activations),
        teacher=[torch.cat(column) for column in zip(*parts.teacher, strict=True)],
        targets=parts.targets if boxes is not None else None,
        input_height=geometry.height,
        input_width=geometry.width,
        description={
            "images": len(images),
            "geometry": str(geometry),
            "digest": digest.hexdigest()[:16],
        },
        reference=torch.cat(parts.reference) if parts.reference else None,
        pixels=torch.cat(parts.pixels) if parts.pixels else None,
    )


@dataclass
class _Prepared:
    """What :func:`prepare` collects batch by batch (on the CPU)."""

    activations: list[Tensor] = field(default_factory=list)
    reference: list[Tensor] = field(default_factory=list)
    teacher: list[list[Tensor]] = field(default_factory=list)
    targets: list[Tensor] = field(default_factory=list)
    pixels: list[Tensor] = field(default_factory=list)

    def add(
        self,
        detector: SplitDetector,
        x: Tensor,
        reference: SplitDetector | None,
        *,
        teacher: bool,
        pixels: bool,
    ) -> None:
        """One letterboxed batch ``x``: its activations, and what :func:`prepare` asks for."""
        a = detector.head(x)
        self.activations.append(a.cpu())
        if pixels:
            grid = (int(a.shape[2]), int(a.shape[3]))
            self.pixels.append(letterboxed_targets(detector, x, grid).cpu())
        teacher_net, teacher_in = detector, a
        if reference is not None:
            teacher_net, teacher_in = reference, reference.head(x)
            self.reference.append(teacher_in.cpu())
        if teacher:
            self.teacher.append([t.cpu() for t in teacher_net.tail(teacher_in)])


def _read_frames(chunk: Sequence[Path | Frame], digest: Any) -> list[Frame]:
    """The chunk's frames (files read), each folded into the run's ``digest`` (a hashlib
    object)."""
    frames = [read_image(p) if isinstance(p, Path) else p for p in chunk]
    for f in frames:
        digest.update(f[::16, ::16].tobytes())
    return frames


def _normalised_boxes(
    boxes: Sequence[BoxArray], letterboxes: Sequence[Letterbox], geometry: InputGeometry
) -> list[Tensor]:
    """Each image's ``[K, 4]`` xyxy pixel boxes as fractions of the letterboxed input."""
    size = torch.tensor([geometry.width, geometry.height, geometry.width, geometry.height])
    return [
        torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) * lb.scale / size
        for b, lb in zip(boxes, letterboxes, strict=True)
    ]


def distillation_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Agreement of the noisy tail with the clean one, where the clean model sees faces.

    Face scores: soft-target cross-entropy against the clean face probability on every prior.
    Boxes (and landmarks): smooth-L1 to the clean regression, weighted by the clean face
    probability, so that background priors do not dominate. Normalised by the expected number
    of faces, as the multibox loss normalises by matched priors.
    """
    loc_s, conf_s = student[0], student[1]
    loc_t, conf_t = teacher[0], teacher[1]
    p = F.softmax(conf_t, dim=-1)[..., 1]
    log_q = F.log_softmax(conf_s, dim=-1)
    norm = p.sum() + 1.0
    conf_loss = -(p * log_q[..., 1] + (1 - p) * log_q[..., 0]).sum() / norm
    loc_loss = (F.smooth_l1_loss(loc_s, loc_t, reduction="none").sum(-1) * p).sum() / norm
    loss = conf_loss + loc_loss
    if len(student) > 2 and len(teacher) > 2:
        lm = F.smooth_l1_loss(student[2], teacher[2], reduction="none").sum(-1) * p
        loss = loss + 0.1 * lm.sum() / norm
    return loss


def random_shift(activations: Tensor, generator: torch.Generator) -> tuple[int, int]:
    """One random (dy, dx) to roll a batch of ``[N, C, H, W]`` activations by."""
    h, w = activations.shape[2], activations.shape[3]
    dy = int(torch.randint(-(h // 2), h // 2 + 1, (1,), generator=generator))
    dx = int(torch.randint(-(w // 2), w // 2 + 1, (1,), generator=generator))
    return dy, dx


def roll(activations: Tensor, shift: tuple[int, int], factor: int = 1) -> Tensor:
    """``activations`` rolled circularly by ``shift`` cells of a grid ``factor`` times coarser."""
    return torch.roll(activations, shifts=(shift[0] * factor, shift[1] * factor), dims=(2, 3))


def _generator(seed: int, alpha: float, epoch: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(hash((seed, round(alpha * 100), epoch)) & ((1 << 62) - 1))
    return gen


def channel_leakage(sigma: Tensor, channel_var: Tensor) -> Tensor:
    """Gaussian-channel bound, nats per element: ``mean 0.5 * log(1 + var / sigma^2)``."""
    var = channel_var.view(-1, 1, 1)
    return (0.5 * torch.log1p(var / sigma.clamp_min(1e-6) ** 2)).mean()


@dataclass
class _Trainer:
    """The state of one alpha's training: noise, the tail being tuned, optimiser, history."""

    teacher: SplitDetector  # the frozen clean detector, or the whole network it was cut from
    student: SplitDetector  # the detector whose tail is tuned (the teacher itself if not)
    layer: NoiseLayer
    optimizer: torch.optim.Optimizer
    channel_var: Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    first_epoch: int = 0
    adversary: Adversary | None = None

    def strength(self, config: CalibrationConfig) -> Tensor:
        if config.leakage == "channel":
            return channel_leakage(self.layer.sigma(), self.channel_var)
        return self.layer.strength_loss()

    def save(self, checkpoint: Path, epoch: int) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        state = {
            "layer": self.layer.state_dict(),
            "tail": self.student.tail_state(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "epoch": epoch,
            "adversary": None if self.adversary is None else self.adversary.state_dict(),
        }
        torch.save(state, tmp)
        tmp.replace(checkpoint)

    def resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None or not checkpoint.is_file():
            return
        state = torch.load(checkpoint, weights_only=False)
        self.layer.load_state_dict(state["layer"])
        self.student.load_state_dict(state["tail"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = state["history"]
        self.first_epoch = state["epoch"] + 1
        if self.adversary is not None and state.get("adversary") is not None:
            self.adversary.load_state_dict(state["adversary"])


def _make_trainer(
    detector: SplitDetector,
    data: CalibrationSet,
    config: CalibrationConfig,
    meta: ProfileMeta,
    reference: SplitDetector | None,
) -> _Trainer:
    c, h, w = data.activations.shape[1:]
    layer = NoiseLayer(
        (int(c), int(h), int(w)), meta.s_min, meta.s_max, meta.training["initial_sigma"]
    )
    groups: list[dict[str, Any]] = [
        {"params": [layer.rho], "lr": config.lr},
        {"params": [layer.mu], "lr": config.lr * config.mu_lr_factor},
    ]
    student = detector
    if config.tune_tail:
        student = copy.deepcopy(detector).eval()
        tail = student.tail_parameters()
        for parameter in tail:
            parameter.requires_grad_(True)
        groups.append({"params": tail, "lr": config.tail_lr})
    channel_var = data.activations.float().var(dim=(0, 2, 3))
    teacher = reference or detector
    adversary = None
    if config.adversary_weight > 0:
        if data.pixels is None:
            raise ConfigError("training against an adversary needs prepare(..., pixels=True)")
        adversary = Adversary.build(
            data.activations, data.pixels, lr=config.adversary_lr, seed=config.seed
        )
    optimizer = torch.optim.Adam(groups)
    return _Trainer(teacher, student, layer, optimizer, channel_var, adversary=adversary)


def _task_loss(
    trainer: _Trainer,
    data: CalibrationSet,
    idx: Tensor,
    config: CalibrationConfig,
    gen: torch.Generator,
    priors: Tensor | None,
) -> Tensor:
    clean = data.activations[idx]
    if config.task == "distill":
        teacher: list[Tensor] = [t[idx] for t in data.teacher]
        if config.augment_shifts:
            # The teacher sees the same shift: on its own input (the reference's finer grid,
            # ``factor`` cells a cell here) when it is the whole network.
            source = clean if data.reference is None else data.reference[idx]
            factor = source.shape[2] // clean.shape[2]
            shift = random_shift(clean, gen)
            clean = roll(clean, shift)
            with torch.no_grad():
                teacher = list(trainer.teacher.tail(roll(source, shift, factor)))
        noisy = trainer.layer(clean, gen)
        return distillation_loss(trainer.student.tail(noisy), teacher)
    raw = trainer.student.tail(trainer.layer(clean, gen))
    from veil.detectors.multibox import multibox_loss

    assert data.targets is not None and priors is not None
    return multibox_loss(raw[0], raw[1], priors, [data.targets[int(i)] for i in idx]).total


def _check_task(
    detector: SplitDetector, data: CalibrationSet, config: CalibrationConfig
) -> Tensor | None:
    if config.task == "multibox":
        if data.targets is None:
            raise ConfigError("task loss 'multibox' needs ground-truth boxes")
        return detector.priors(data.input_height, data.input_width, torch.device("cpu"))
    if not config.augment_shifts and not data.teacher:
        raise ConfigError("distillation without shifts needs prepare(..., teacher=True)")
    return None


def _adversary_advantage(
    trainer: _Trainer, adversary: Adversary, data: CalibrationSet, idx: Tensor, gen: torch.Generator
) -> Tensor:
    """Train the adversary one step on a fresh draw, then score that draw against it."""
    noisy = trainer.layer(data.activations[idx], gen)
    mu, sigma = trainer.layer.mu, trainer.layer.sigma()
    adversary.learn(noisy, mu, sigma, idx)
    return adversary.advantage(noisy, mu, sigma, idx)


def _run_epoch(
    trainer: _Trainer,
    data: CalibrationSet,
    alpha: float,
    config: CalibrationConfig,
    epoch: int,
    priors: Tensor | None,
    bar: tqdm[Any],
) -> dict[str, float]:
    gen = _generator(config.seed, alpha, epoch)
    n = data.activations.shape[0]
    steps = -(-n // config.batch_size)
    order = torch.randperm(n, generator=gen)
    sums = {"loss": 0.0, "task": 0.0, "strength": 0.0}
    for s in range(steps):
        idx = order[s * config.batch_size : (s + 1) * config.batch_size]
        task = _task_loss(trainer, data, idx, config, gen, priors)
        strength = trainer.strength(config)
        loss = (1 - alpha) * config.task_weight * task + alpha * strength
        if trainer.adversary is not None:
            advantage = _adversary_advantage(trainer, trainer.adversary, data, idx, gen)
            loss = loss + alpha * config.adversary_weight * advantage
            sums["adversary"] = sums.get("adversary", 0.0) + float(advantage.detach())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        trainer.optimizer.step()
        for key, value in (("loss", loss), ("task", task), ("strength", strength)):
            sums[key] += float(value.detach())
        bar.update(1)
        bar.set_postfix(
            task=f"{float(task.detach()):.3f}",
            sigma=f"{float(trainer.layer.sigma().detach().mean()):.3f}",
        )
    sigma = trainer.layer.sigma().detach()
    return {k: v / steps for k, v in sums.items()} | {
        "mean_sigma": float(sigma.mean()),
        "leakage_nats": float(channel_leakage(sigma, trainer.channel_var)),
    }


def train_profile(
    detector: SplitDetector,
    data: CalibrationSet,
    alpha: float,
    config: CalibrationConfig,
    meta: ProfileMeta,
    checkpoint: Path | None = None,
    progress: bool = True,
    reference: SplitDetector | None = None,
) -> NoiseProfile:
    """Learn the noise (and, with ``tune_tail``, its tail) for one alpha; resumable.
    ``reference``: the teacher when ``data`` was prepared with one."""
    priors = _check_task(detector, data, config)
    if (reference is None) != (data.reference is None):
        raise ConfigError("a reference teacher needs prepare(..., reference=) and vice versa")
    detector.eval().requires_grad_(False)
    trainer = _make_trainer(detector, data, config, meta, reference)
    trainer.resume(checkpoint)
    steps = -(-data.activations.shape[0] // config.batch_size)
    bar = tqdm(
        total=config.epochs * steps,
        initial=trainer.first_epoch * steps,
        desc=f"alpha {alpha:.2f}",
        disable=not progress,
        unit="step",
    )
    for epoch in range(trainer.first_epoch, config.epochs):
        trainer.history.append(_run_epoch(trainer, data, alpha, config, epoch, priors, bar))
        if checkpoint is not None:
            trainer.save(checkpoint, epoch)
    bar.close()
    training = dict(meta.training) | {
        "epochs_run": len(trainer.history),
        "loss_curve": trainer.history,
    }
    tail = trainer.student.tail_state() if config.tune_tail else None
    return profile_from_layer(trainer.layer, replace(meta, training=training), tail)


def _profile_meta(
    detector: SplitDetector,
    geometry: InputGeometry,
    data: CalibrationSet,
    config: CalibrationConfig,
    alpha: float,
    run_id: str,
    source: str,
    act_std: float,
    teacher: str,
) -> ProfileMeta:
    """What a profile records of how it was made (before its loss curve is known);
    ``act_std`` is the clean activations' standard deviation, the unit of the noise bounds."""
    return ProfileMeta(
        model=detector.name,
        weights_id=detector.weights_id,
        geometry=str(geometry),
        activation_shape=tuple(data.activations.shape[1:]),  # type: ignore[arg-type]
        alpha=alpha,
        s_min=config.sigma_min_ratio * act_std,
        s_max=config.sigma_max_ratio * act_std,
        task_loss=config.task,
        trained_on={"source": source} | data.description,
        training={
            "run_id": run_id,
            "seed": config.seed,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "task_weight": config.task_weight,
            "augment_shifts": config.augment_shifts,
            "mu_lr_factor": config.mu_lr_factor,
            "sigma_max_ratio": config.sigma_max_ratio,
            "activation_std": act_std,
            "initial_sigma": config.initial_sigma_ratio * act_std,
            "leakage": config.leakage,
            "tune_tail": config.tune_tail,
            "tail_lr": config.tail_lr,
            "teacher": teacher,
            "adversary_weight": config.adversary_weight,
        },
    )


def calibrate(
    detector: SplitDetector,
    images: Sequence[Path | Frame],
    out_dir: Path,
    config: CalibrationConfig | None = None,
    boxes: Sequence[BoxArray] | None = None,
    source: str = "",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[NoiseProfile]:
    """Produce (or complete) a profile bank in ``out_dir`` for every alpha of ``config``."""
    config = config or CalibrationConfig()
    geometry = config.geometry or detector.default_geometry
    if config.task == "multibox" and boxes is None:
        raise ConfigError("task loss 'multibox' needs labels; use the default 'distill' without")
    if not images:
        raise DatasetError("calibration needs at least one image")
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    bank = ProfileBank(out_dir)
    data, reference = _calibration_set(detector, images, geometry, boxes, config, progress)
    teacher = (reference or detector).name if config.task == "distill" else "labels"
    act_std = float(data.activations.std())
    run_id = _run_id(data, config, detector)
    profiles: list[NoiseProfile] = []
    # Read the bank once: this run only adds profiles for alphas it has not found there.
    finished = [p for p in bank.profiles() if p.meta.training.get("run_id") == run_id]
    for alpha in config.alphas:
        alpha = check_alpha(alpha)
        existing = [p for p in finished if p.alpha == alpha]
        if existing:
            log(f"alpha {alpha:.2f}: already calibrated ({existing[0].profile_id}), skipped")
            profiles.append(existing[0])
            continue
        t0 = time.perf_counter()
        meta = _profile_meta(
            detector, geometry, data, config, alpha, run_id, source, act_std, teacher
        )
        checkpoint = out_dir / ".partial" / f"{run_id}-a{alpha:.2f}.pt"
        profile = train_profile(
            detector, data, alpha, config, meta, checkpoint, progress, reference
        )
        profile = _timed(profile, time.perf_counter() - t0)
        bank.save(profile)
        checkpoint.unlink(missing_ok=True)
        log(_trained_line(profile, act_std))
        profiles.append(profile)
    log(f"calibration finished in {time.perf_counter() - started:.1f} s; bank: {out_dir}")
    return profiles


def _calibration_set(
    detector: SplitDetector,
    images: Sequence[Path | Frame],
    geometry: InputGeometry,
    boxes: Sequence[BoxArray] | None,
    config: CalibrationConfig,
    progress: bool,
) -> tuple[CalibrationSet, SplitDetector | None]:
    """The images through the frozen head once, with what ``config``'s training needs (the
    whole network's outputs when it is the teacher, the pixels when an adversary trains);
    and that reference network, if any."""
    distill = config.task == "distill"
    reference = detector.reference() if distill and config.reference_teacher else None
    data = prepare(
        detector,
        images,
        geometry,
        boxes,
        config.batch_size,
        progress,
        teacher=distill and not config.augment_shifts,
        reference=reference,
        pixels=config.adversary_weight > 0,
    )
    return data, reference


def _run_id(data: CalibrationSet, config: CalibrationConfig, detector: SplitDetector) -> str:
    """What names one calibration run: its images, settings and weights."""
    document = {"data": data.description, "config": repr(config), "weights": detector.weights_id}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def _timed(profile: NoiseProfile, seconds: float) -> NoiseProfile:
    """``profile`` recording how long it took to train."""
    training = profile.meta.training | {"seconds": round(seconds, 1)}
    return NoiseProfile(
        replace(profile.meta, training=training), profile.mu, profile.rho, profile.tail
    )


def _trained_line(profile: NoiseProfile, act_std: float) -> str:
    last = profile.meta.training["loss_curve"][-1]
    seconds = profile.meta.training["seconds"]
    return (
        f"alpha {profile.alpha:.2f}: profile {profile.profile_id} in {seconds:.1f} s "
        f"(task loss {last['task']:.4f}, mean sigma {last['mean_sigma']:.3f} "
        f"= {last['mean_sigma'] / act_std:.2f} activation std, leakage "
        f"bound {last['leakage_nats']:.3f} nats/element, tail "
        f"{'tuned' if profile.tail is not None else 'frozen'})"
    )
