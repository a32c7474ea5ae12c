"""Keeps Python's full garbage collections off the server's long-lived objects.

A full (generation 2) collection walks every container object the interpreter tracks, and it
holds the GIL while it does, so the event loop and every engine thread stop meanwhile. After
startup and a model load that is 100-250 thousand objects (modules, pydantic models, the
engines' Python parts), none of which becomes garbage while the model stays loaded: profiled
under 8 streams with the model listings polled, such collections were the longest stalls of
``/health`` (one pass of 142k objects took 0.3-1 s on the loaded 2-core machine).
``gc.freeze()`` moves everything tracked at that moment into the permanent generation, which
collections skip; objects made later are collected as before.

Frozen objects are still freed when their reference count drops; only reference cycles among
them would stay. So a freeze follows a full collection (nothing that is garbage already is
kept), and an unload thaws the heap: the unloaded engine's cycles, once its threads have
ended, go with the next full collection, and the next load freezes what is alive again. The
collection before a freeze is one pause per load, where there used to be one every few
hundred requests.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """After startup and after each load: collect, then freeze what is alive."""
    gc.collect()
    gc.freeze()


def after_unload() -> None:
    """Thaw the heap, so that collections can reach what the unloaded model left in cycles."""
    gc.unfreeze()
