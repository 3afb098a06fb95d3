"""Train the digit demos: class-conditional transformers on scikit-learn's bundled 8x8 digits.

    python tools/train_digits.py [--family dit|sd3] [--iterations N] [--out FOLDER] [--grid FILE]

Two families, both in pixel space (one channel, 8x8, patch 2: 16 tokens), pixels 0..16
mapped to [-1, 1], labels dropped to the null class 10 with probability 0.1 (so
classifier-free guidance works too):

- ``--family dit`` (``demo-digits``, the default): a diffusers ``DiTTransformer2DModel``
  trained with the DDPM epsilon objective on the linear 1000-step beta schedule that
  ``fora-export validate``, ``quality`` and ``sample`` sample with (diffusers' DDIM
  scheduler, ``beta_schedule="linear"``).
- ``--family sd3`` (``demo-digits-flow``): an ``SD3Transformer2DModel`` (MMDiT) trained
  with the rectified-flow objective of diffusers' ``FlowMatchEulerDiscreteScheduler`` as
  the SD3 adapter records it (``x_t = (1 - sigma) x_0 + sigma noise``, velocity target
  ``noise - x_0``, graph timestep ``sigma * 1000``, sigma drawn through the scheduler's
  ``shift``). Its conditioning inputs are a learned table per class (see
  ``fora_export/quality/conditioning.py``), trained jointly and saved beside the weights.

Nothing is downloaded (``load_digits`` ships with scikit-learn). The run is seeded
and deterministic on one machine with one thread count: the same command gives the
same losses and weights. The committed weights were written by the defaults; their
``training_log.json`` holds the command's settings, the first losses (which a test
reproduces) and the loss curve. ``--grid`` draws samples (no caching) per class.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fora_export.adapters.sd3 import SCHEDULER_CONFIG as SD3_SCHEDULER_CONFIG
from fora_export.bench import describe_machine
from fora_export.demo import DEMO_DIGITS_DIR, DEMO_DIGITS_FLOW_DIR, DIGITS_FLOW_TEXT_LENGTH
from fora_export.quality.conditioning import save_class_conditioning

#: The DiT: 4 blocks of hidden 64 (4 heads of 16) on 2x2 patches of the 8x8 image
#: (16 tokens), 0.4M parameters; epsilon only (out_channels = in_channels, no learned
#: sigma); 10 classes (+ the null class). A first, wider try (6 blocks of 96, peak lr 1e-3)
#: had 21% of its samples classified as their label after 1500 iterations; this one
#: (peak lr 2e-3, each iteration ~3x cheaper) 92% after 3000.
DIGITS_CONFIG: dict[str, Any] = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}
#: The SD3 MMDiT: 4 joint blocks of hidden 64 (4 heads of 16, the last context_pre_only) on
#: the same 16 image tokens, with DIGITS_FLOW_TEXT_LENGTH "text" tokens of width 32 and a
#: pooled vector of 32 (the learned class tables); 0.58M parameters.
DIGITS_FLOW_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 4,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 64,  # the blocks' width: SD3 projects text to it
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 4,  # the 4x4 patch grid
}
NUM_CLASSES = 10
NULL_CLASS = 10
LABEL_DROP = 0.1
TRAIN_TIMESTEPS = 1000
#: How many per-iteration losses the log keeps exactly (the reproduction test reads them).
LOGGED_FIRST_LOSSES = 20


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as [N, 1, 8, 8] float32 in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(digits.target.astype(np.int64))


def init_linears(model: nn.Module) -> None:
    """DiT's recipe for linears: Xavier-uniform weights, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


class DigitsFamily(ABC):
    """What one model family needs to be trained on the digits and sampled."""

    name: ClassVar[str]
    #: The demo whose save_pretrained folder the defaults write.
    demo: ClassVar[str]
    default_out: ClassVar[Path]
    #: Defaults of the committed run.
    iterations: ClassVar[int]
    peak_lr: ClassVar[float]
    #: For the log and the loss plot.
    objective: ClassVar[str]

    @abstractmethod
    def make_model(self, seed: int) -> nn.Module:
        """The untrained model, seeded."""

    @abstractmethod
    def loss(
        self, model: nn.Module, clean: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The training loss of one batch; draws its noise from ``generator``."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The objective's settings, for the log."""

    @abstractmethod
    def save(self, model: nn.Module, out: Path) -> nn.Module:
        """Write the save_pretrained folder (and what sampling needs besides); returns the
        model as saved, for :meth:`sample`."""

    @abstractmethod
    def sample(self, model: Any, labels: torch.Tensor, steps: int = 50, seed: int = 0) -> torch.Tensor:
        """Samples in PyTorch (no caching), [N, 1, 8, 8] in [-1, 1]."""


class DiTDigits(DigitsFamily):
    name = "dit"
    demo = "demo-digits"
    default_out = DEMO_DIGITS_DIR
    iterations = 6000
    peak_lr = 2e-3
    objective = "epsilon MSE"

    def make_model(self, seed: int) -> nn.Module:
        return make_model(seed)

    def __init__(self) -> None:
        from diffusers import DDPMScheduler

        self.noise_schedule = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear")

    def loss(
        self, model: nn.Module, clean: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        noise = torch.randn(clean.shape, generator=generator)
        timestep = torch.randint(0, TRAIN_TIMESTEPS, (len(clean),), generator=generator)
        noisy = self.noise_schedule.add_noise(clean, noise, timestep)
        prediction = model(noisy, timestep=timestep, class_labels=label, return_dict=False)[0]
        return F.mse_loss(prediction, noise)

    def settings(self) -> dict[str, Any]:
        return {"beta_schedule": "linear", "num_train_timesteps": TRAIN_TIMESTEPS}

    def save(self, model: nn.Module, out: Path) -> nn.Module:
        saved: Any = untie_embedders(model)
        saved.save_pretrained(out)
        return saved

    def sample(self, model: Any, labels: torch.Tensor, steps: int = 50, seed: int = 0) -> torch.Tensor:
        return sample(model, labels, steps, seed)


def make_model(seed: int) -> nn.Module:
    """The untrained DiT, initialised as DiT does, with one embedder shared by all blocks.

    DiT's recipe: Xavier-uniform linears, zero biases, N(0, 0.02) timestep MLP and label
    table, and the adaLN projections and final layer zero (every block starts as the
    identity). Sharing the blocks' timestep/label embedder mirrors converted DiT
    checkpoints (one embedder copied into every block), which the lean reuse graph exploits.
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model: Any = DiTTransformer2DModel(**DIGITS_CONFIG)
    with torch.no_grad():
        init_linears(model)
        shared = model.transformer_blocks[0].norm1.emb
        nn.init.normal_(shared.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(shared.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(shared.timestep_embedder.linear_2.weight, std=0.02)
        for block in model.transformer_blocks:
            block.norm1.emb = shared
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for final in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(final.weight)
            nn.init.zeros_(final.bias)
    # Labels are dropped to the null class by the loop below, once per sample; the
    # embedder's own dropout would draw anew in each block calling the shared embedder.
    shared.class_embedder.dropout_prob = 0.0
    return model


def untie_embedders(model: Any) -> Any:
    """A copy with one embedder per block (equal weights), as diffusers saves and loads it."""
    model = copy.deepcopy(model)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(shared)
    return model


class ClassConditionedSD3(nn.Module):
    """The SD3 transformer and its "text encoder": one learned row per class (and the null
    class) for each conditioning input, ``encoder_hidden_states`` [tokens, width] and
    ``pooled_projections`` [width], as a frozen text encoder gives one embedding per
    prompt. The rows are named after the inputs, which the engines' manifest lists."""

    def __init__(self, transformer: Any, text_tokens: int) -> None:
        super().__init__()
        self.transformer = transformer
        config = transformer.config
        self.text_shape = (text_tokens, int(config.joint_attention_dim))
        self.encoder_hidden_states = nn.Embedding(NUM_CLASSES + 1, text_tokens * self.text_shape[1])
        self.pooled_projections = nn.Embedding(NUM_CLASSES + 1, int(config.pooled_projection_dim))

    def tables(self) -> dict[str, torch.Tensor]:
        """Input name -> [classes + 1, per-sample shape]."""
        return {
            "encoder_hidden_states": self.encoder_hidden_states.weight.view(-1, *self.text_shape),
            "pooled_projections": self.pooled_projections.weight,
        }

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        conditioning = {name: table[labels] for name, table in self.tables().items()}
        return self.transformer(hidden_states=latents, timestep=timestep, return_dict=False, **conditioning)[
            0
        ]


class SD3Digits(DigitsFamily):
    name = "sd3"
    demo = "demo-digits-flow"
    default_out = DEMO_DIGITS_FLOW_DIR
    #: Tried (PyTorch samples, 50 steps, 500 of them): 1500 iterations 97.8% classified as
    #: their label, Fréchet distance 1.30; 2000 iterations 97.6%, 1.17, a third longer.
    iterations = 1500
    peak_lr = 2e-3
    objective = "velocity MSE"

    @property
    def shift(self) -> float:
        return float(SD3_SCHEDULER_CONFIG["shift"])

    def make_model(self, seed: int) -> nn.Module:
        """DiT's initialisation applied to the MMDiT: Xavier linears, N(0, 0.02) timestep MLP,
        every adaLN projection (image and text streams) and the final layer zero; the class
        tables N(0, 1), as unit-scale text embeddings."""
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(seed)
        transformer: Any = SD3Transformer2DModel(**DIGITS_FLOW_CONFIG)
        model = ClassConditionedSD3(transformer, DIGITS_FLOW_TEXT_LENGTH)
        with torch.no_grad():
            init_linears(transformer)
            timestep_embedder = transformer.time_text_embed.timestep_embedder
            nn.init.normal_(timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(timestep_embedder.linear_2.weight, std=0.02)
            for block in transformer.transformer_blocks:
                for norm in (block.norm1, block.norm1_context):
                    nn.init.zeros_(norm.linear.weight)
                    nn.init.zeros_(norm.linear.bias)
            for final in (transformer.norm_out.linear, transformer.proj_out):
                nn.init.zeros_(final.weight)
                nn.init.zeros_(final.bias)
            nn.init.normal_(model.encoder_hidden_states.weight)
            nn.init.normal_(model.pooled_projections.weight)
        return model

    def loss(
        self, model: nn.Module, clean: torch.Tensor, label: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        noise = torch.randn(clean.shape, generator=generator)
        # FlowMatchEulerDiscreteScheduler's shifted time: u uniform, sigma = s u / (1 + (s - 1) u),
        # the distribution its shifted training timesteps have (SD3 trains so, shift 3).
        u = torch.rand(len(clean), generator=generator)
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1) * noise
        prediction = model(noisy, sigma * TRAIN_TIMESTEPS, label)
        return F.mse_loss(prediction, noise - clean)

    def settings(self) -> dict[str, Any]:
        return {
            "objective": "rectified flow: x_t = (1 - sigma) x_0 + sigma noise, target noise - x_0",
            "sigma": "u ~ U(0, 1), sigma = shift u / (1 + (shift - 1) u)",
            "shift": self.shift,
            "timestep": "sigma * num_train_timesteps",
            "num_train_timesteps": TRAIN_TIMESTEPS,
            "text_tokens": DIGITS_FLOW_TEXT_LENGTH,
        }

    def save(self, model: nn.Module, out: Path) -> nn.Module:
        assert isinstance(model, ClassConditionedSD3)
        transformer: Any = model.transformer
        transformer.save_pretrained(out)
        save_class_conditioning(model.tables(), out, null_class=NULL_CLASS)
        return model

    @torch.no_grad()
    def sample(self, model: Any, labels: torch.Tensor, steps: int = 50, seed: int = 0) -> torch.Tensor:
        """Flow-matching Euler samples (SD3's scheduler and shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler: Any = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(len(labels), 1, 8, 8, generator=generator)
        for t in scheduler.timesteps:
            velocity = model(latents, t.expand(len(labels)), labels)
            latents = scheduler.step(velocity, t, latents).prev_sample
        return latents.clamp(-1, 1)


FAMILIES: dict[str, DigitsFamily] = {family.name: family for family in (DiTDigits(), SD3Digits())}


def learning_rate(iteration: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if iteration < warmup:
        return peak * (iteration + 1) / warmup
    progress = (iteration - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    iterations: int,
    *,
    family: str = "dit",
    batch_size: int = 128,
    peak_lr: float = 2e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    seed: int = 0,
    log_every: int = 100,
    quiet: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train; returns the EMA model (DiT: tied embedders) and the training log.
    Deterministic algorithms are on for the run (and restored after)."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(
            FAMILIES[family], iterations, batch_size, peak_lr, warmup, ema_decay, seed, log_every, quiet
        )
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _train(
    family: DigitsFamily,
    iterations: int,
    batch_size: int,
    peak_lr: float,
    warmup: int,
    ema_decay: float,
    seed: int,
    log_every: int,
    quiet: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    images, labels = digits_dataset()
    model = family.make_model(seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    for iteration in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(iteration, iterations, peak_lr, warmup)
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        clean, label = images[index], labels[index].clone()
        label[torch.rand(batch_size, generator=generator) < LABEL_DROP] = NULL_CLASS
        loss = family.loss(model, clean, label, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        # Warm the average up from a short memory (DiT's fixed decay assumes long runs).
        decay = min(ema_decay, (1 + iteration) / (10 + iteration))
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
                ema_param.lerp_(param, 1 - decay)
        losses.append(loss.item())
        if (iteration + 1) % log_every == 0 or iteration + 1 == iterations:
            window = losses[-log_every:]
            point = {
                "iteration": iteration + 1,
                "loss": float(np.mean(window)),
                "seconds": round(time.perf_counter() - started, 1),
            }
            curve.append(point)
            if not quiet:
                print(
                    f"iter {point['iteration']:5d}  loss {point['loss']:.4f}  {point['seconds']:7.1f} s",
                    flush=True,
                )
    log = {
        "settings": {
            "family": family.name,
            "iterations": iterations,
            "batch_size": batch_size,
            "peak_lr": peak_lr,
            "warmup": warmup,
            "ema_decay": ema_decay,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "label_drop": LABEL_DROP,
            **family.settings(),
        },
        "machine": f"{describe_machine()}, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - started, 1),
        "first_losses": losses[:LOGGED_FIRST_LOSSES],
        "loss_curve": curve,
    }
    return ema, log


@torch.no_grad()
def sample(model: Any, labels: torch.Tensor, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """DDIM samples of the DiT in PyTorch (no caching), [N, 1, 8, 8] in [-1, 1]."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(labels), 1, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        timestep = torch.full((len(labels),), float(t))
        eps = model(latents, timestep=timestep, class_labels=labels, return_dict=False)[0]
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents.clamp(-1, 1)


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 8) -> None:
    """Images [rows * cols, 1, 8, 8] in [-1, 1] as one PNG, nearest-neighbour upscaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(images) // rows
    pixels = ((images[:, 0].numpy() + 1) / 2).reshape(rows, cols, 8, 8)
    padded = np.pad(pixels, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=0.5)
    grid = padded.transpose(0, 2, 1, 3).reshape(rows * 10, cols * 10)
    plt.imsave(path, np.kron(grid, np.ones((scale, scale))), cmap="gray", vmin=0, vmax=1)


def plot_losses(curve: list[dict[str, float]], path: Path, family: DigitsFamily) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([p["iteration"] for p in curve], [p["loss"] for p in curve])
    axis.set_xlabel("iteration")
    axis.set_ylabel(f"{family.objective} (window mean)")
    axis.set_yscale("log")
    axis.set_title(f"{family.demo} training loss")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--family", choices=sorted(FAMILIES), default="dit", help="dit: demo-digits, sd3: demo-digits-flow"
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="default: the family's (dit 6000, sd3 1500)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the family's)")
    parser.add_argument("--seed", type=int, default=0)
    # One thread: on a shared 2-core machine two OpenMP threads ran 5x slower per iteration
    # than one (each waits for the other at every barrier while another process holds a core).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument(
        "--out", type=Path, default=None, help="save_pretrained folder to write (default: the demo's)"
    )
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG of samples, one row per class")
    parser.add_argument("--loss-plot", type=Path, default=None, help="write a PNG of the loss curve")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    out = args.out if args.out is not None else family.default_out
    torch.set_num_threads(args.threads)
    model, log = train(
        args.iterations if args.iterations is not None else family.iterations,
        family=family.name,
        batch_size=args.batch_size,
        peak_lr=args.lr if args.lr is not None else family.peak_lr,
        seed=args.seed,
        log_every=args.log_every,
    )
    log = {"command": " ".join(["python", "tools/train_digits.py", *sys.argv[1:]]), **log}
    out.mkdir(parents=True, exist_ok=True)
    saved = family.save(model, out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {out} ({log['seconds']:.0f} s of training)")
    if args.loss_plot is not None:
        plot_losses(log["loss_curve"], args.loss_plot, family)
        print(f"loss curve: {args.loss_plot}")
    if args.grid is not None:
        per_class = 10
        labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        save_grid(family.sample(saved.eval(), labels), NUM_CLASSES, args.grid)
        print(f"samples: {args.grid}")


if __name__ == "__main__":
    main()
