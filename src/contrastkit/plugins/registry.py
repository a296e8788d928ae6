"""The plug-in registry: ``PLUGINS`` maps the configuration name (``plugins.<name>``) to the class.

Adding a plug-in is one file in this package and one line at the bottom of this module. :func:`check_plugins` is
what :meth:`contrastkit.config.Config.validate` runs, so an unknown plug-in, a bad option or an incompatible host
is refused before training (before any run directory exists); :func:`build_plugins` makes the plug-ins of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from contrastkit.errors import ConfigError
from contrastkit.plugins.base import Plugin, PluginSet

if TYPE_CHECKING:
    from contrastkit.config import Config

PLUGINS: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: add ``cls`` to :data:`PLUGINS` under ``cls.name``."""
    if not cls.name or cls.name in PLUGINS:
        raise ValueError(f"plug-in name {cls.name!r} is empty or taken")
    PLUGINS[cls.name] = cls
    return cls


def plugin_class(name: str) -> type[Plugin]:
    if name not in PLUGINS:
        raise ConfigError(f"unknown plug-in plugins.{name}; available: {', '.join(sorted(PLUGINS)) or 'none'}")
    return PLUGINS[name]


def check_plugins(cfg: Config) -> dict[str, Any]:
    """The validated options of each configured plug-in; ConfigError naming the key or both sides otherwise."""
    options = {}
    for name, raw in cfg.plugins.items():
        cls = plugin_class(name)
        options[name] = cls.parse_options(raw)
        cls.check_host(cfg.method.name, cfg.method.contrastive_loss)  # infonce when unset
        cls.check_config(options[name], cfg)
    return options


def build_plugins(cfg: Config) -> PluginSet:
    """The plug-ins of ``cfg.plugins`` (empty set without a ``plugins`` section)."""
    return PluginSet([PLUGINS[name].build(opts, cfg) for name, opts in check_plugins(cfg).items()])


def host_rows() -> list[tuple[str, str | None]]:
    """``(method, loss)`` rows of the compatibility matrix: each method with each loss it reads, or ``None``."""
    from contrastkit.losses import LOSSES
    from contrastkit.methods import METHODS

    first: dict[type, str] = {}
    for name, cls in LOSSES.items():  # one name per loss class (infonce, not its alias ntxent)
        first.setdefault(cls, name)
    losses = sorted(first.values())
    rows: list[tuple[str, str | None]] = []
    for method, cls in METHODS.items():
        rows += [(method, loss) for loss in losses] if cls.own_loss is None else [(method, None)]
    return rows


def compatible(plugin: type[Plugin], method: str, loss: str | None) -> bool:
    try:
        plugin.check_host(method, loss if loss is not None else "")
    except ConfigError:
        return False
    return True


def plugin_matrix() -> str:
    """The host x plug-in compatibility table (what ``contrastkit plugins`` prints)."""
    names = sorted(PLUGINS)
    rows = host_rows()
    hosts = [m if loss is None else f"{m} + {loss}" for m, loss in rows]
    width = max(len("host"), *map(len, hosts))
    lines = ["  ".join([f"{'host':<{width}}", *names])]
    for host, (method, loss) in zip(hosts, rows):
        cells = [f"{'yes' if compatible(PLUGINS[n], method, loss) else '-':<{len(n)}}" for n in names]
        lines.append("  ".join([f"{host:<{width}}", *cells]).rstrip())
    return "\n".join(lines)


from contrastkit.plugins import ascl  # noqa: E402,F401  (registers; one line per plug-in)
from contrastkit.plugins import curation  # noqa: E402,F401
from contrastkit.plugins import batch_fusion  # noqa: E402,F401
