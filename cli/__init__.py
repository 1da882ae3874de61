"""The ``mabeam`` command (:func:`mabeam.cli.main.main`).

``up`` runs a mesh on this machine; ``status``, ``agents``, ``vars``,
``sessions``, ``auction`` and ``goal`` operate one; ``backup`` / ``restore``
save and load its durable state; ``bench`` measures it. The command stands
on top of every other layer: nothing imports it.
"""

from mabeam.cli.main import main

__all__ = ["main"]
