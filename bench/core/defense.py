"""Base class of every defense: owns a model, its training recipe, and `predict` (and `certify`)."""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from bench.core.data import DatasetSpec
from bench.core.errors import ConfigError
from bench.core.input_normalization import NormalizedInput, check_normalization
from bench.core.models import build_model
from bench.core.registry import DATASETS, DEFENSES, MODELS, DefenseInfo, RegistrationError
from bench.core.types import Cell
from bench.core.weights import WeightsError, call_factory, file_sha256, load_state, map_keys, read_checkpoint

__all__ = ["TrainConfig", "Defense", "CertifiedDefense", "check_defense_class", "certified_norm", "build_defense",
           "cell_defense", "defense_memo"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule of a training run.

    schedule 'step': `milestones` divide the lr by 10 (Madry et al. 2018). schedule 'cyclic': one
    triangle, the lr rising linearly from 0 to `lr` over the first 2/5 of the steps and falling to 0
    at the last (the one-cycle schedule of Wong, Rice & Kolter 2020, "Fast is better than free").
    """

    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    augment: bool = True
    schedule: str = "step"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'adam' or 'sgd'")
        if self.schedule not in ("step", "cyclic"):
            raise ValueError(f"unknown lr schedule {self.schedule!r}; use 'step' or 'cyclic'")
        if self.schedule == "cyclic" and self.milestones:
            raise ValueError("milestones belong to schedule = 'step'; the cyclic schedule has none")
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0")


class Defense(ABC):
    """A trainable defense: builds its model, trains it with `loss` (abstract), predicts and judges.

    Subclasses must define `loss` (the training objective) and may override `after_step`,
    `attach`, `predict` and `judge`; certified ones also implement `CertifiedDefense`. Facts about
    a defense (randomized, certified, family, ...) live in its registry info (bench.core.registry.DefenseInfo),
    never in class attributes.
    """

    def __init__(self, spec: DatasetSpec, *, arch: str | None = None, arch_params: dict[str, Any] | None = None,
                 factory: str | None = None, factory_kwargs: dict[str, Any] | None = None,
                 weights: str | None = None, weights_keys: dict[str, str] | None = None,
                 weights_prefix: str | None = None, weights_entry: str | None = None,
                 weights_sha256: str | None = None, input_mean: float | list[float] | None = None,
                 input_std: float | list[float] | None = None, **train: Any):
        self.spec = spec
        if arch and ":" in arch and factory is None:
            factory, arch = arch, None  # arch = "package.module:function" names a factory too
        self.arch = factory or arch or spec.default_model
        self.arch_params = dict(arch_params or {})
        # The user's own network and weights (bench.core.weights): `factory` builds it, `weights` fills it.
        self.factory = factory
        self.factory_kwargs = dict(factory_kwargs or {})
        if factory is not None and ":" not in str(factory):
            raise ValueError(f"factory {factory!r} must look like 'package.module:function'")
        if weights_keys is not None and not (isinstance(weights_keys, dict)
                                             and all(isinstance(v, str) for v in weights_keys.values())):
            raise ValueError("weights_keys must be a table { checkpoint_name = \"module_name\", ... }")
        self.weights = None if weights in (None, "") else Path(str(weights)).expanduser()
        self.weights_keys, self.weights_prefix, self.weights_entry = weights_keys, weights_prefix, weights_entry
        self.weights_sha256 = weights_sha256
        # The network's own input normalization (bench.core.input_normalization): (mean, std) or None.
        self.input_normalization = check_normalization(input_mean, input_std, spec.shape[0])
        if "milestones" in train:
            train["milestones"] = tuple(train["milestones"])
        self.train_config = TrainConfig(**train)
        self.model: nn.Module | None = None
        self.generator: torch.Generator | None = None
        # Set by the training loop to a generator seeded per step: a defense's own training draws
        # (e.g. adversarial random starts) come from it, so training is reproducible and resumable.
        self.step_generator: torch.Generator | None = None

    @property
    def info(self) -> DefenseInfo:
        """The registry info of this defense's class (or of its nearest registered base class)."""
        for klass in type(self).__mro__:
            name = DEFENSES.name_of(klass)
            if name is not None:
                return DEFENSES.info(name)
        raise RegistrationError(f"{type(self).__name__} is not registered in DEFENSES; register it with "
                                "@DEFENSES.register(name, family=..., randomized=..., certified=...)")

    @property
    def randomized(self) -> bool:
        """Whether predictions draw noise: read from the registry info (the one place the fact lives)."""
        return self.info.randomized

    @classmethod
    def resolve_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Parameters as stored in the cell (and hashed into its key); e.g. add a weights file's hash."""
        return params

    def build_model(self) -> nn.Module:
        """A fresh, untrained model for this defense (the user's factory when given, else the registry's arch),
        behind the `input_mean` / `input_std` normalization when given: it still takes [0,1] pixels."""
        if self.factory is not None:
            model = call_factory(self.factory, self.factory_kwargs)
        else:
            model = build_model(self.arch, self.spec.shape, self.spec.classes, **self.arch_params)
        if self.input_normalization is None:
            return model
        return NormalizedInput(model, *self.input_normalization)

    def weights_target(self, model: nn.Module) -> nn.Module:
        """The part of `model` that the `weights` file fills (all of it; a wrapper may pick its base classifier)."""
        return model

    def starting_model(self) -> nn.Module:
        """`build_model()` with the user's `weights` loaded: what training starts from, or, with steps = 0,
        the model."""
        model = self.build_model()
        if self.weights is not None:
            path = self.weights.resolve()
            if self.weights_sha256 is not None and path.is_file() and file_sha256(path) != self.weights_sha256:
                raise WeightsError(f"weights file {path} changed since the profile was resolved; run again")
            state = map_keys(read_checkpoint(path, self.weights_entry), keys=self.weights_keys,
                             prefix=self.weights_prefix)
            target = self.weights_target(model)
            # The weights are the user's network's: the normalization in front of it holds no weights of theirs.
            load_state(target.network if isinstance(target, NormalizedInput) else target, state, path)
        return model

    def has_weights(self) -> bool:
        """True when the model starts from given weights (a `weights` file, or a factory's or an arch's own
        `weights` keyword, e.g. pretrained ones)."""
        if self.weights is not None:
            return True
        if self.factory is not None:
            return self.factory_kwargs.get("weights") not in (None, "", "none")
        if self.arch in MODELS:
            default = inspect.signature(MODELS.get(self.arch)).parameters.get("weights")
            chosen = self.arch_params.get("weights", None if default is None else default.default)
            return chosen not in (None, "none", inspect.Parameter.empty)
        return False

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError (one line) when `model` cannot be evaluated by this defense, e.g. a layer a bound lacks."""
        return None

    @abstractmethod
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Training loss (a scalar) of one batch x (N, C, H, W), y (N,) at optimizer step `step`."""

    def after_step(self, model: nn.Module) -> None:
        """Hook run after every optimizer step (e.g. PixelDP's Parseval projection)."""
        return None

    def train_state(self) -> dict[str, Any]:
        """Training-time state of the defense itself (tensors and plain values) saved in checkpoints."""
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        """Restore what `train_state` returned, when training resumes from a checkpoint."""
        return None

    def reseed(self, seed: int) -> None:
        """Restart the evaluation noise from `seed` (the runner does this per cell, so no cell's draws
        depend on which cells ran before it in the process)."""
        if self.generator is not None:
            self.generator.manual_seed(seed)

    def attach(self, model: nn.Module, generator: torch.Generator | None = None) -> None:
        """Adopt a trained (or loaded) model for prediction; `generator` drives any noise."""
        self.model = model.eval()
        self.generator = generator

    def attached_model(self) -> nn.Module:
        """The model `attach` adopted; RuntimeError before `attach` (there is nothing to evaluate yet)."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} has no model: call attach(model) first")
        return self.model

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels (N,) for images x (N, C, H, W) in [0,1]."""
        return self.attached_model()(x).argmax(dim=1)

    def judge(self, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(labels (N,), certified radii (N,) or None) for adversarial inputs, with fresh noise.

        Certified defenses return the radius of each adversarial prediction (robust precision).
        """
        return self.predict(x_adv), None


@runtime_checkable
class CertifiedDefense(Protocol):
    """What a certified defense provides besides `Defense`: radii with a guarantee, in a known norm."""

    def certify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (N,), radius (N,)) for images x (N, C, H, W): radius >= 0, in input units of
        `certified_norm`, within which pred is guaranteed (with the defense's stated failure
        probability); 0 where nothing is certified."""
        ...

    @classmethod
    def certified_norm(cls, params: dict[str, Any]) -> str:
        """The norm ("l1", "l2" or "linf") of the radii for the resolved defense parameters `params`."""
        ...


def check_defense_class(name: str, cls: Any, info: DefenseInfo) -> None:
    """Registration contract: a concrete Defense subclass whose methods agree with its DefenseInfo."""
    where = f"defense {name!r}"
    if not (inspect.isclass(cls) and issubclass(cls, Defense)):
        raise RegistrationError(f"{where} must be a subclass of bench.core.defense.Defense, got {cls!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise RegistrationError(f"{where}: {cls.__name__} does not implement {missing}")
    if info.certified and not issubclass(cls, CertifiedDefense):
        raise RegistrationError(f"{where} is registered certified=True but {cls.__name__} lacks "
                                "certify(x) and certified_norm(params) (bench.core.defense.CertifiedDefense)")
    if not info.certified and issubclass(cls, CertifiedDefense):
        raise RegistrationError(f"{where}: {cls.__name__} implements certify; register it with certified=True")
    accepted = {n for klass in cls.__mro__ if "__init__" in vars(klass) and klass is not object
                for n in inspect.signature(vars(klass)["__init__"]).parameters}
    unknown = sorted(set(info.eval_params) - accepted)
    if unknown:
        raise RegistrationError(f"{where}: eval_params names {unknown[0]!r}, not a parameter of {cls.__name__}")
    if info.certified_norm is not None:
        stated = cast("type[CertifiedDefense]", cls).certified_norm({})
        if stated != info.certified_norm:
            raise RegistrationError(f"{where}: certified_norm={info.certified_norm!r} but {cls.__name__}."
                                    f"certified_norm({{}}) = {stated!r}")


DEFENSES.check = check_defense_class  # the registry imports nothing it registers: its contract is installed here


def build_defense(defense: str, dataset: str, params: dict[str, Any], where: str) -> Defense:
    """The registered `defense` constructed for `dataset` with `params`: no model built, nothing trained.

    The one place a defense object is made (profile resolution, preflight, model plans, the runner),
    so a bad parameter reads the same line wherever it is found: a constructor's TypeError or
    ValueError becomes one ConfigError naming the defense and `where`.
    """
    cls, spec = DEFENSES.get(defense), DATASETS.get(dataset)
    try:
        return cls(spec, **params)
    except WeightsError as exc:  # a ConfigError already: only say where
        raise WeightsError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad parameters for defense {defense!r} in {where}: {exc}") from exc


def cell_defense(cell: Cell, params: dict[str, Any] | None = None) -> Defense:
    """`build_defense` for a cell (with `params` instead of its own when given); errors name its profile entry."""
    return build_defense(cell.defense, cell.dataset, cell.defense_params if params is None else params,
                         f"[defenses.{cell.defense_label}] on {cell.dataset}")


def defense_memo(cell: Cell) -> str:
    """What a run builds, trains and plans a cell's defense once per: its configuration (Cell.defense_config)."""
    return repr(sorted(cell.defense_config().items()))


def certified_norm(defense: str, params: dict[str, Any]) -> str:
    """The norm a certified defense's radii are in: its registered `certified_norm`, else its class's
    `certified_norm(params)`; for a name not registered here (e.g. a plugin not loaded), its `norm`
    parameter, else "" (unknown)."""
    if defense not in DEFENSES:
        return str(params.get("norm") or "")
    info = DEFENSES.info(defense)
    if not info.certified:
        return str(params.get("norm") or "")
    return info.certified_norm or str(DEFENSES.get(defense).certified_norm(params) or "")
