"""Plug-ins: the seed techniques that compose with the methods (ASCL; batch fusion, batch curation and All4One
terms use the same seam). See :mod:`contrastkit.plugins.base` for the hooks and their order and
:mod:`contrastkit.plugins.registry` for the registry.

>>> from contrastkit.plugins import PLUGINS, plugin_matrix
"""

from contrastkit.plugins.base import Plugin, PluginSet, StepContext
from contrastkit.plugins.registry import PLUGINS, build_plugins, check_plugins, plugin_matrix, register

__all__ = ["PLUGINS", "Plugin", "PluginSet", "StepContext", "build_plugins", "check_plugins", "plugin_matrix",
           "register"]
