"""One typed training job for every study: data, model, train config and seeds in, a checkpoint in the run folder out.

A :class:`TrainJob` names everything that decides the trained weights (dataset and its held-out slice, model
spec, :class:`~mergelab.train.TrainConfig`, init seed, an optional upstream job to fine-tune from), so the runner's
job cache keys it by value. :meth:`TrainJob.run` trains the model and saves it with :func:`mergelab.io.save` to
``RUN/models/NAME`` (``model.safetensors`` + ``config.json``, the job's fingerprint in its metadata); a later run
whose checkpoint is already there loads it instead of training, so studies resume and their models can be reused
by anyone (``mergelab.load(RUN/models/NAME, model=job.model.build(...))``, or ``mergelab.load`` alone for zoo
models). Studies pass :class:`TrainJob` s (not weights) to their analysis jobs, which call :meth:`TrainJob.load`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from mergelab.experiments._study import load_study_data, resolve_device, to_device
from mergelab.train import TrainConfig

log = logging.getLogger(__name__)

MODELS = "models"  # the run folder's sub-folder of checkpoints


@functools.lru_cache(maxsize=8)
def _dataset(name: str, root: str, options: str) -> Any:
    """The dataset (cached per process: worker processes run many jobs on one dataset)."""
    kwargs = json.loads(options)
    if name == "stdlib-text":
        from mergelab.data.text import load_stdlib_corpus

        return load_stdlib_corpus(**kwargs)
    return load_study_data(name, root, **kwargs)


@dataclass(frozen=True)
class DataSpec:
    """The data a job trains on: a dataset, a held-out slice of its training split, and an optional class subset.

    Args:
        name: a ``mergelab.data`` dataset (``digits``, ``mnist1d``, ``cifar10`` …) or ``"stdlib-text"`` (the
            byte-level corpus of :func:`mergelab.data.text.load_stdlib_corpus`; ``test`` is its validation split).
        root: folder of a local dataset (cifar10 / cifar100 / mnist).
        options: loader keyword arguments (e.g. ``{"num_samples": 5000}`` for MNIST-1D, ``block_size`` for text).
        holdout: fraction of the training split held out (never trained on), drawn with ``holdout_seed``.
        classes: train on these classes only (a task of a multi-task study).
        relabel: with ``classes``, map labels to ``0..len(classes)-1`` (a task's own head); else keep them.
    """

    name: str
    root: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    holdout: float = 0.0
    holdout_seed: int = 0
    classes: tuple[int, ...] = ()
    relabel: bool = True

    def load(self) -> Any:
        """The dataset object (``train``, ``test`` / ``val``, ``input_shape``, ``num_classes``)."""
        return _dataset(self.name, self.root, json.dumps(dict(self.options), sort_keys=True))

    def splits(self, device: torch.device | str = "cpu") -> tuple[Any, Any, Any]:
        """(fit, held-out, test) on ``device``: the training split without its held-out slice (whole, all
        classes), the held-out slice (``None`` without a holdout) and the test split."""
        d = self.load()
        dev = resolve_device(device) if isinstance(device, str) else device
        test = getattr(d, "test", None) or d.val
        if self.holdout <= 0:
            return _to(d.train, dev), None, _to(test, dev)
        x, y = d.train.tensors[:2]
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.holdout_seed))
        n_hold = max(1, int(round(self.holdout * len(x))))
        held = TensorDataset(x[perm[:n_hold]], y[perm[:n_hold]])
        fit = TensorDataset(x[perm[n_hold:]], y[perm[n_hold:]])
        return to_device(fit, dev), to_device(held, dev), _to(test, dev)

    def train_set(self, device: torch.device | str = "cpu") -> Any:
        """What the job trains on: the fit split, restricted to ``classes`` when given."""
        fit = self.splits(device)[0]
        if not self.classes:
            return fit
        from mergelab.data import split_classes

        return split_classes(fit, [list(self.classes)], relabel=self.relabel)[0]


def _to(ds: Any, device: torch.device) -> Any:
    return to_device(ds, device) if isinstance(ds, TensorDataset) else ds


@dataclass(frozen=True)
class ModelSpec:
    """How to build the untrained model.

    Args:
        arch: a zoo architecture (``mlp``, ``cnn``, ``resnet``, ``vgg``, ``vit`` …) or ``"gpt2"`` (a
            ``transformers`` ``GPT2LMHeadModel`` built from ``kwargs`` as its ``GPT2Config``).
        kwargs: the architecture's options (width, depth …).
        outputs: ``"classes"``: a head over the data's classes (the task's classes when the data is relabelled);
            ``"embedding"``: ZipIt!'s set-up, the net projects onto fixed orthonormal class vectors of dimension
            ``embed_dim`` (:class:`~mergelab.merge.partial.ClassEmbeddingModel`).
    """

    arch: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Literal["classes", "embedding"] = "classes"
    embed_dim: int = 0

    def build(self, data: DataSpec) -> nn.Module:
        """A freshly initialised model (seed the RNG first) for ``data``."""
        if self.arch == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            return GPT2LMHeadModel(GPT2Config(**self.kwargs))
        from mergelab.models import build_model

        d = data.load()
        classes = list(data.classes) if data.classes else list(range(d.num_classes))
        n_out = len(classes) if data.classes and data.relabel else d.num_classes
        if self.outputs == "classes":
            return build_model(self.arch, d.input_shape, n_out, **self.kwargs)
        if self.outputs == "embedding":
            from mergelab.merge.partial import ClassEmbeddingModel, class_embeddings

            net = build_model(self.arch, d.input_shape, self.embed_dim, **self.kwargs)
            return ClassEmbeddingModel(net, class_embeddings(d.num_classes, self.embed_dim, seed=0)[classes])
        raise ValueError(f"ModelSpec: unknown outputs {self.outputs!r}; choose 'classes' or 'embedding'")


@dataclass(frozen=True)
class TrainResult:
    """What a finished :class:`TrainJob` reports (the weights are in its checkpoint)."""

    name: str
    checkpoint: str  # relative to the run folder
    train_accuracy: float
    train_loss: tuple[float, ...]  # per epoch
    test_accuracy: float | None = None  # with ``TrainJob.evaluate``
    heldout_accuracy: float | None = None  # with ``TrainJob.evaluate`` and a holdout
    seconds: float = 0.0  # wall time of training itself
    cpu_seconds: float = 0.0  # CPU time of the whole job (data, build, train, evaluate)


@dataclass(frozen=True)
class TrainJob:
    """Train one model and save it into the run folder; the unit of work of every study.

    Args:
        name: checkpoint folder under ``RUN/models/`` (e.g. ``"digits-mlp-w1/seed-3"``).
        data, model, train: what to train on, what to build, how to train (``data_seed`` orders batches).
        init_seed: RNG seed before building the model (its initial weights).
        init: an upstream job whose trained weights this one starts from (fine-tuning a pretrained backbone).
        head_seed: with ``init``, re-initialise the model's ``head`` with this seed (a new task's fresh head).
        evaluate: also measure test (and held-out) accuracy of the trained model.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
        threads: torch threads while the job runs (jobs run in parallel processes).
        run_dir: the run folder (set by the study); not part of the job's identity, so a resumed run whose
            folder moved still finds its finished jobs.
    """

    name: str
    data: DataSpec
    model: ModelSpec
    train: TrainConfig
    init_seed: int
    init: TrainJob | None = None
    head_seed: int | None = None
    evaluate: bool = False
    device: str = "auto"
    threads: int = 1
    run_dir: str = field(default="", compare=False, metadata={"fingerprint": False})

    def at(self, run_dir: str | Path) -> TrainJob:
        """This job writing into ``run_dir`` (its upstream job too)."""
        init = self.init.at(run_dir) if self.init is not None else None
        return dataclasses.replace(self, run_dir=str(run_dir), init=init)

    @property
    def checkpoint(self) -> Path:
        if not self.run_dir:
            raise ValueError(f"TrainJob {self.name!r}: run_dir is not set (use job.at(run_folder))")
        return Path(self.run_dir) / MODELS / self.name

    def fingerprint(self) -> str:
        """A hash of everything that decides the trained weights (not ``run_dir``)."""
        from mergelab.experiments._jobcache import _feed

        h = hashlib.sha256(b"TrainJob")
        _feed(h, self)
        return h.hexdigest()[:20]

    def run(self) -> TrainResult:
        """Train and save the checkpoint, or read back the result of a checkpoint this job already saved."""
        done = self._saved_result()
        if done is not None:
            return done
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._train()
        finally:
            torch.set_num_threads(threads)

    def load(self, device: torch.device | str | None = None) -> nn.Module:
        """The trained model in eval mode (trained here first if its checkpoint is not there yet)."""
        from mergelab.io import load

        if self._saved_result() is None:
            self.run()
        # building draws initial weights, overwritten by the checkpoint: keep the caller's RNG stream as it was
        with torch.random.fork_rng(devices=[]):
            model = load(self.checkpoint, model=self.model.build(self.data))
        if device is not None:
            model.to(resolve_device(device) if isinstance(device, str) else device)
        return model.eval()

    def _saved_result(self) -> TrainResult | None:
        from mergelab.io import CheckpointError, read_config

        if not (self.checkpoint / "model.safetensors").is_file():
            return None
        try:
            meta = read_config(self.checkpoint).get("metadata", {})
        except CheckpointError:
            return None
        if meta.get("job") != self.fingerprint():
            return None
        r = meta["result"]
        return TrainResult(**{**r, "train_loss": tuple(r["train_loss"])})

    def _train(self) -> TrainResult:
        from mergelab.evaluation import evaluate
        from mergelab.io import save
        from mergelab.train import train

        c0 = time.process_time()
        device = resolve_device(self.device)
        torch.manual_seed(self.init_seed)
        model = self.model.build(self.data)
        if self.init is not None:
            model.load_state_dict(self.init.load().state_dict())
            # fine-tuning: a fresh head, as when a pretrained net meets a new task
            if self.head_seed is not None:
                torch.manual_seed(self.head_seed)
                model.head.reset_parameters()
        model.to(device)
        t_train = time.perf_counter()
        history = train(model, self.data.train_set(device), self.train)
        train_seconds = time.perf_counter() - t_train
        test_acc = held_acc = None
        if self.evaluate:
            _, held, test = self.data.splits(device)
            test_acc = evaluate(model, tensor_batches(test)).accuracy
            held_acc = evaluate(model, tensor_batches(held)).accuracy if held is not None else None
        result = TrainResult(
            name=self.name,
            checkpoint=f"{MODELS}/{self.name}",
            train_accuracy=float(history.final.get("train_accuracy", float("nan"))),
            train_loss=tuple(float(x) for x in history.train_loss),
            test_accuracy=test_acc,
            heldout_accuracy=held_acc,
            seconds=train_seconds,
            cpu_seconds=time.process_time() - c0,
        )
        meta = {"job": self.fingerprint(), "result": dataclasses.asdict(result), "data": self.data.name}
        save(model, self.checkpoint, metadata=meta, force=True)
        return result


def tensor_batches(ds: TensorDataset, size: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches as tensor slices (a DataLoader would index a TensorDataset sample by sample)."""
    x, y = ds.tensors[0], ds.tensors[1]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def run_train_job(job: TrainJob) -> TrainResult:
    """``job.run()`` as a top-level function (what ``executor.map`` ships to worker processes or Ray)."""
    return job.run()
