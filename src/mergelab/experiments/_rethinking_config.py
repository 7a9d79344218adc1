"""The ``rethinking`` study's settings: pool kinds, per-architecture model sizes, the config and its presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POOL_KINDS = ("pretrained", "pretrained_random_head", "shared", "independent")

# Per-architecture sizes that train in seconds on one CPU core (8x8 digits, length-40 MNIST-1D). Keys are an
# arch or "dataset/arch" (applied after the arch's entry).
DEFAULT_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 128, "depth": 2},
    "cnn": {"width": 16, "depth": 3},
    # Three stride-2 convs shrink 8x8 to 1x1 (16 features): too narrow a bottleneck to fine-tune from a
    # 5-class backbone (fine-tuned copies reach ~0.4); two convs keep a 2x2 map.
    "digits/cnn": {"depth": 2},
    "vgg": {"width": 0.25},
    "resnet": {"depth": 8, "width": 0.5},
    "vit": {"dim": 32, "depth": 2, "heads": 2},
}

METHOD_COLUMNS = (
    "indiv. mean",
    "best indiv.",
    "soup",
    "greedy soup",
    "logit ens.",
    "prob. ens.",
    "feat. ens. (first head)",
    "feat. ens. (avg head)",
    "greedy ens.",
    "aligned soup",
)


@dataclass(frozen=True)
class RethinkingConfig:
    """Settings of the ``rethinking`` study; the defaults run in a few minutes on 2 CPU cores."""

    datasets: tuple[str, ...] = ("digits",)
    archs: tuple[str, ...] = ("mlp", "cnn", "resnet")
    # intervals and verdicts are over seeds (each seed: its own pools); 5 seeds ran in 7.3 min on 2 cores
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # "pretrained_random_head" (each fine-tuned copy gets its own random head) is available but not default.
    pools: tuple[str, ...] = ("pretrained", "shared", "independent")
    n_members: tuple[int, ...] = (
        2,
        3,
        5,
        10,
    )  # the paper's N ∈ {2, 3, 5, 7, 10}; subsets of the first N members; max(n_members) are trained
    # Per arch or "dataset/arch", merged over DEFAULT_MODEL_KWARGS.
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    heldout_fraction: float = 0.15  # of the train split: greedy selection data, never trained on
    epochs: int = 10  # from-scratch training (shared / independent pools, and pretraining)
    lr: float = 3e-3
    batch_size: int = 128
    pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)  # the "upstream task" of the pretrained pool
    pretrain_epochs: int = 20  # on half the data, so about as many steps as `epochs` on all of it
    finetune_epochs: int = 10
    finetune_lrs: tuple[float, ...] = (2e-3, 3e-3, 1e-3)  # cycled over members: different hyper-parameters
    align_independent: bool = True  # add an aligned soup (weight matching) for independent pools if available
    # Stability under scaling: which archs, which pool, which perturbations ("kind:members").
    stability_archs: tuple[str, ...] = ("mlp", "resnet")
    stability_pool: str = "pretrained"
    stability_perturbations: tuple[str, ...] = ("scale:all", "scale:one", "scale:all_but_one", "noise:all")
    scale_factors: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 100.0)
    noise_levels: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
    # Weight patterns: linear classifiers (templates) and first-layer units.
    patterns: bool = True
    pattern_models: int = 2
    pattern_epochs: int = 30
    pattern_weight_decay: float = 1e-2  # a little decay gives cleaner templates (the paper uses 0.1 with SGD)
    pattern_pairs: tuple[tuple[int, int], ...] = ((1, 7), (3, 8), (4, 9))
    n_bootstrap: int = 1000  # unused since intervals are over seeds; kept so older study files still load
    torch_threads: int = 1  # per training job (jobs run in parallel on Ray)
    soup_margin: float = 0.02  # "soup ≈ ensemble" means |soup − logit ens.| < this (accuracy)
    preset: str = "default"  # "paper": CIFAR-10 VGG / ResNet-20 pools of N = 10 (needs data_root)
    device: str = "auto"  # "auto" = CUDA when present
    data_root: str = ""  # folder of a local dataset (cifar10 / cifar100 / mnist)

    def __post_init__(self) -> None:
        bad = sorted(set(self.pools) - set(POOL_KINDS))
        if bad:
            raise ValueError(f"RethinkingConfig: unknown pool kind(s) {bad}; choose from {list(POOL_KINDS)}")
        if not self.n_members or min(self.n_members) < 1:
            raise ValueError(f"RethinkingConfig: n_members must be positive, got {self.n_members}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(
                f"RethinkingConfig: heldout_fraction must lie in (0, 0.5), got {self.heldout_fraction}"
            )
        if self.stability_pool not in POOL_KINDS:
            raise ValueError(f"RethinkingConfig: unknown stability_pool {self.stability_pool!r}")
        for p in self.stability_perturbations:
            parse_perturbation(p)
        if not self.finetune_lrs:
            raise ValueError("RethinkingConfig: finetune_lrs is empty")

    def arch_kwargs(self, arch: str, dataset: str | None = None) -> dict[str, Any]:
        """Model options: defaults for ``arch``, then ``dataset/arch``; then both keys of ``model_kwargs``."""
        out: dict[str, Any] = {}
        for table in (DEFAULT_MODEL_KWARGS, self.model_kwargs):
            out.update(table.get(arch, {}))
            if dataset is not None:
                out.update(table.get(f"{dataset}/{arch}", {}))
        return out


# The paper's setting: CIFAR-10, pools of up to 10 fine-tuned copies of a pretrained backbone (here: pretrained on
# classes 0–4 of CIFAR-10 itself; the paper starts from ImageNet weights, which mergelab never downloads).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "datasets": ("cifar10",),
        "archs": ("vgg", "resnet"),
        "seeds": (0, 1, 2),
        "n_members": (2, 3, 5, 7, 10),
        "model_kwargs": {"vgg": {"width": 1.0}, "resnet": {"depth": 20, "width": 1}},
        "epochs": 60,
        "pretrain_epochs": 60,
        "finetune_epochs": 20,
        "stability_archs": ("resnet",),
        "patterns": False,
    }
}


def parse_perturbation(spec: str) -> tuple[str, str, str | None]:
    """``"scale:all"``, ``"noise:one"``, ``"scale_head:all"``, ``"scale_first:one"`` → (kind, who, layers)."""
    try:
        kind, members = spec.split(":")
    except ValueError:
        raise ValueError(
            f"stability perturbation {spec!r} must look like 'scale:all' or 'noise:one'"
        ) from None
    layers = None
    if kind.startswith("scale_"):
        kind, layers = "scale", kind.split("_", 1)[1]
        if layers not in ("head", "first"):
            raise ValueError(f"stability perturbation {spec!r}: layer must be 'head' or 'first'")
    if kind not in ("scale", "noise") or members not in ("all", "one", "all_but_one"):
        raise ValueError(
            f"stability perturbation {spec!r}: kind must be scale|scale_head|scale_first|noise and members "
            "all|one|all_but_one"
        )
    return kind, members, layers
