"""Model zoo: published checkpoints pinned by SHA-256, found offline or downloaded, verified before every load."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from bench.core.atomic import advice, atomic_path, is_disk_error
from bench.core.weights import WeightsError, file_sha256

if TYPE_CHECKING:
    from bench.profile.config import Profile

__all__ = ["ENV", "PREFIX", "ZOO", "Published", "ZooEntry", "by_sha256", "cache_folder", "describe", "expand",
           "is_zoo", "locate", "locate_profile", "lookup", "search_folders"]

PREFIX = "zoo:"  # weights = "zoo:NAME" in a defense's params
ENV = "PIXELDP_BENCH_WEIGHTS"  # a folder of weight files (also read for Inception-v3, bench.core.archs.inception)
WONG_REPO = "https://github.com/locuslab/convex_adversarial"
# "Provable defenses against adversarial examples via the convex outer adversarial polytope".
WONG_PAPER = "Wong & Kolter, ICML 2018"
WONG_LICENCE = "MIT licence, (c) 2018 Eric Wong"
WONG_NET = "defenses.convex.models:wong2018_net"


@dataclass(frozen=True)
class Published:
    """A paper's numbers for one checkpoint, in % of the test set, under an L-inf ball of radius `eps`.

    `input_box` False: the plain ball, not intersected with the [0,1] pixel box (Wong & Kolter's set).
    `clean_error` None: not recorded here. `decimals`: the precision the numbers were published with.
    """

    eps: float
    robust_error: float  # the certified bound on the error under any attack in the ball
    clean_error: float | None = None
    norm: str = "linf"
    input_box: bool = False
    decimals: int = 2

    def text(self, value: float | None) -> str:
        """A published number as published ("1.80%"), or "not recorded"."""
        return "not recorded" if value is None else f"{value:.{self.decimals}f}%"


@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint: where it comes from, the network it fills, and what its authors published."""

    name: str
    file: str  # the name looked for in a weights folder (the download is saved under it too)
    sha256: str
    url: str  # the file in the authors' public repository
    dataset: str
    architecture: str  # for `list --zoo`
    normalization: str
    published: Published
    paper: str = WONG_PAPER
    licence: str = WONG_LICENCE
    factory: str = WONG_NET
    factory_kwargs: dict[str, Any] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """The defense parameters the entry sets: its network and its pinned hash (part of every cell key)."""
        return {"factory": self.factory, "factory_kwargs": dict(self.factory_kwargs), "weights_sha256": self.sha256}


def _wong(name: str, original: str, dataset: str, sha256: str, published: Published, channels: int = 1,
          size: int = 28) -> ZooEntry:
    """An entry for the authors' models/<original>.pth: their net on (channels, size, size) [0,1] images."""
    return ZooEntry(
        name=name, file=f"wong2018_{original}.pth", sha256=sha256, url=f"{WONG_REPO}/raw/master/models/{original}.pth",
        dataset=dataset, published=published, factory_kwargs={"channels": channels, "size": size},
        architecture=f"conv16(4,s2,p1)-conv32(4,s2,p1)-fc100-fc10 on {channels}x{size}x{size} (their "
                     f"{'mnist' if channels == 1 else 'svhn'}_model)",
        normalization="none (inputs in [0,1])")


# Wong & Kolter (ICML 2018): errors of the released models on the full test sets, as published. SVHN's bound is
# quoted to one decimal (40.7% at eps 0.01) and its clean error is not recorded here.
ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    _wong("wong2018-mnist", "mnist", "mnist",
          "95014ab0c04c73f48b3be0cb7acc42aff60ce4420c6c43bec25e9a1447279e08",
          Published(eps=0.1, clean_error=1.80, robust_error=5.82)),
    _wong("wong2018-fashion-mnist", "fashion_mnist", "fashion_mnist",
          "b90cca41cc42b427d5ba1d1c10d90a5a8b6b5219538a3a4d1c6f825d3f612bc5",
          Published(eps=0.1, clean_error=21.73, robust_error=34.53)),
    _wong("wong2018-svhn", "svhn", "svhn",
          "c357ed5e96a488f73a5d134a017a2aafaf657218bcd119d383a19575569f6886",
          Published(eps=0.01, robust_error=40.7, decimals=1), channels=3, size=32),
)}
# Parameters a zoo entry decides: giving them next to weights = "zoo:NAME" would build another network.
_SET_BY_ZOO = ("arch", "arch_params", "factory", "factory_kwargs", "weights_keys", "weights_prefix", "weights_entry",
               "weights_sha256", "input_mean", "input_std")


def is_zoo(weights: Any) -> TypeGuard[str]:
    """Whether a `weights` parameter names a zoo entry ("zoo:NAME")."""
    return isinstance(weights, str) and weights.startswith(PREFIX)


def lookup(weights: str) -> ZooEntry:
    """The entry of "zoo:NAME" (or NAME); WeightsError listing the entries otherwise."""
    name = weights[len(PREFIX):] if is_zoo(weights) else weights
    if name not in ZOO:
        raise WeightsError(f"unknown zoo model {name!r}; the zoo has {', '.join(ZOO)} (pixeldp-bench list --zoo)")
    return ZOO[name]


def by_sha256(sha256: Any) -> ZooEntry | None:
    """The entry whose pinned file has this SHA-256 (None for any other file)."""
    return next((e for e in ZOO.values() if e.sha256 == sha256), None)


def expand(params: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Defense params with `weights = "zoo:NAME"` completed by the entry (network, pinned hash); others unchanged."""
    if not is_zoo(params.get("weights")):
        return params
    entry = lookup(params["weights"])
    if dataset != entry.dataset:
        raise WeightsError(f"zoo model {entry.name} was trained on {entry.dataset}, not {dataset}; give it in "
                           f"dataset_params.{entry.dataset} (or restrict the defense with datasets = "
                           f"[\"{entry.dataset}\"])")
    clash = [k for k in _SET_BY_ZOO if k in params and params[k] != entry.params().get(k)]
    if clash:
        raise WeightsError(f"weights = \"{params['weights']}\" sets the network and its hash itself; remove "
                           f"{', '.join(clash)} from the defense's params")
    return params | entry.params()


def cache_folder() -> Path:
    """Where --download saves zoo files: $XDG_CACHE_HOME/pixeldp-bench/zoo (default ~/.cache/pixeldp-bench/zoo)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pixeldp-bench" / "zoo"


def search_folders(root: str | Path | None = None) -> list[Path]:
    """Folders searched for zoo files, in order: `root` (--weights-root) else $PIXELDP_BENCH_WEIGHTS, then the cache."""
    given = root if root is not None else os.environ.get(ENV)
    return ([Path(given).expanduser().resolve()] if given else []) + [cache_folder()]


def verify(entry: ZooEntry, path: Path) -> Path:
    """`path` when its SHA-256 is the entry's; otherwise one WeightsError naming both hashes and the fix."""
    found = file_sha256(path)
    if found != entry.sha256:
        raise WeightsError(f"zoo model {entry.name}: {path} has SHA-256 {found}, expected {entry.sha256}; it is not "
                           f"the released file (altered, truncated or another model): replace it with {entry.url}, "
                           "or delete it and run with --download")
    return path


def _looked(entry: ZooEntry, folders: list[Path], download: bool = False) -> str:
    """Where the file was looked for and every way to provide it; after a failed --download, not --download again."""
    fetch = ("check the network connection and run again" if download
             else f"fetch it from {entry.url} with --download (needs internet)")
    return (f"{entry.file} was not found in {', '.join(map(str, folders))}; pass --weights-root DIR (or set "
            f"${ENV}=DIR) for a folder holding it (from {entry.url}), or {fetch}")


def _download(entry: ZooEntry, destination: Path, folders: list[Path], fetch: Callable[[str, str], Any] | None) -> None:
    """Fetch the entry's file to `destination` and verify it; one WeightsError when the download fails or differs."""
    try:
        if fetch is None:
            from torch.hub import download_url_to_file

            download_url_to_file(entry.url, str(destination), progress=False)
        else:
            fetch(entry.url, str(destination))
    except Exception as exc:  # offline, HTTP error: the message says what else works
        if is_disk_error(exc):
            raise  # the cache's disk, not the network: bench.core.atomic names the file and the fix
        raise WeightsError(f"zoo model {entry.name}: downloading {entry.url} failed ({type(exc).__name__}: "
                           f"{exc}); {_looked(entry, folders, download=True)}") from exc
    found = file_sha256(destination)
    if found != entry.sha256:
        raise WeightsError(f"zoo model {entry.name}: the file downloaded from {entry.url} has SHA-256 {found}, "
                           f"expected {entry.sha256}: it is not the released file (the download was deleted); run "
                           "again later, or get the file by hand and pass its folder with --weights-root DIR")


def locate(entry: ZooEntry, root: str | Path | None = None, download: bool = False,
           fetch: Callable[[str, str], Any] | None = None) -> Path:
    """The verified local file of `entry`: found in `search_folders(root)`, else downloaded when `download`.

    A download goes to a temporary name in `cache_folder()` (bench.core.atomic) and replaces the file
    only once its SHA-256 matches, so a failed or altered download never stays. `fetch(url,
    destination)` defaults to torch.hub.download_url_to_file.
    """
    folders = search_folders(root)
    for folder in folders:
        if (folder / entry.file).is_file():
            return verify(entry, folder / entry.file)
    if not download:
        raise WeightsError(f"zoo model {entry.name}: {_looked(entry, folders)}")
    target = cache_folder() / entry.file
    with advice(f"run again, or put {entry.file} in a folder given with --weights-root DIR"), \
            atomic_path(target) as partial:
        _download(entry, partial, folders, fetch)
    return target


def locate_profile(profile: Profile, root: str | Path | None, download: bool) -> Profile:
    """`profile` with every `weights = "zoo:NAME"` replaced by the verified file's absolute path (`locate`).

    The pinned hash is already in the cells (`expand`); bench.profile.preflight hashes the file again before
    any cell runs, and every load compares the file with it (bench.core.defense).
    """
    located: dict[str, str] = {}
    cells = []
    for cell in profile.cells:
        weights = cell.defense_params.get("weights")
        if is_zoo(weights):
            if weights not in located:
                try:
                    located[weights] = str(locate(lookup(weights), root, download))
                except WeightsError as exc:
                    raise WeightsError(f"[defenses.{cell.defense_label}]: {exc}") from None
            cell = dataclasses.replace(cell, defense_params=cell.defense_params | {"weights": located[weights]})
        cells.append(cell)
    return dataclasses.replace(profile, cells=cells)


def _where(entry: ZooEntry, folders: list[Path]) -> str:
    """'found PATH', 'found PATH, WRONG SHA-256' or 'not found' for `list --zoo`."""
    for folder in folders:
        path = folder / entry.file
        if path.is_file():
            return f"found {path}" + ("" if file_sha256(path) == entry.sha256 else ", WRONG SHA-256 (not used)")
    return "not found (run with --weights-root DIR or --download)"


def describe(root: str | Path | None = None) -> str:
    """The zoo as text for `pixeldp-bench list --zoo`: one block per entry, local availability included."""
    folders = search_folders(root)
    lines = [f"zoo models (weights = \"zoo:NAME\"; files looked for in {', '.join(map(str, folders))}):"]
    for entry in ZOO.values():
        p = entry.published
        ball = "plain ball" if not p.input_box else "ball in [0,1]"
        lines += [f"  {entry.name:24s} {entry.dataset:14s} sha256 {entry.sha256[:12]}  {_where(entry, folders)}",
                  f"      network    {entry.architecture}; normalization {entry.normalization}",
                  f"      published  {p.norm} eps {p.eps:g} ({ball}): clean error {p.text(p.clean_error)}, "
                  f"robust error bound {p.text(p.robust_error)} ({entry.paper})",
                  f"      source     {entry.url} ({entry.licence})"]
    return "\n".join(lines) + "\n"
