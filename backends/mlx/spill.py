"""The MLX prompt cache's entries on disk (see :mod:`backends.spill`) as safetensors: per-layer
KV, plain or quantized, and the layers of checkpoints (recurrent states, sliding windows)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from backends.base import LoadOptions
from backends.mlx.kvquant import QuantizedCache
from backends.spill import SpillStore, open_store

log = logging.getLogger("mlxserve.backends")


def _parts(x: Any) -> tuple[mx.array, ...]:
    return x if isinstance(x, tuple) else (x,)


def _layer(i: int, c: Any, arrays: dict[str, mx.array]) -> dict[str, Any] | None:
    """Put layer ``i``'s arrays in ``arrays``; its description, or None for a layer kind
    that is not written."""
    if type(c) in (KVCache, QuantizedCache):
        for name, x in (("k", c.keys), ("v", c.values)):
            for j, a in enumerate(_parts(x)):
                arrays[f"{i}.{name}.{j}"] = a
        if isinstance(c, QuantizedCache):
            return {"bits": c.bits, "group_size": c.group_size}
        return {}
    if type(c) is RotatingKVCache:
        keys, values, offset, keep, max_size, idx = c.state
        arrays[f"{i}.k.0"], arrays[f"{i}.v.0"] = keys, values
        return {"kind": "rotating", "offset": offset, "keep": keep, "size": max_size, "idx": idx}
    if type(c) is ArraysCache:
        states: list[Any] = c.cache
        for j, a in enumerate(states):
            if a is not None:
                arrays[f"{i}.s.{j}"] = a
        return {"kind": "arrays", "present": [a is not None for a in states]}
    return None


def _restored(i: int, layer: dict[str, Any], arrays: dict[str, mx.array], n: int) -> Any:
    kind = layer.get("kind")
    if kind == "rotating":
        c: Any = RotatingKVCache(int(layer["size"]), int(layer["keep"]))
        c.state = (
            arrays[f"{i}.k.0"],
            arrays[f"{i}.v.0"],
            int(layer["offset"]),
            int(layer["keep"]),
            int(layer["size"]),
            int(layer["idx"]),
        )
        return c
    if kind == "arrays":
        present = [bool(p) for p in layer["present"]]
        states = [arrays[f"{i}.s.{j}"] if p else None for j, p in enumerate(present)]
        c = ArraysCache(len(states))
        c.state = (states, None, None)
        return c
    parts = 3 if layer else 1

    def read(name: str) -> Any:
        got = tuple(arrays[f"{i}.{name}.{j}"][..., :n, :] for j in range(parts))
        return got if parts > 1 else got[0]

    if layer:
        c = QuantizedCache(group_size=int(layer["group_size"]), bits=int(layer["bits"]))
    else:
        c = KVCache()
    c.keys, c.values = read("k"), read("v")
    c.offset = n
    return c


def _layer_arrays(c: Any) -> list[mx.array]:
    if type(c) is ArraysCache:
        states: list[Any] = c.cache
        return [a for a in states if a is not None]
    return [a for x in (c.keys, c.values) for a in _parts(x)]


class MLXSpill:
    """Writes prompt-cache entries the memory budget pushes out (and all of them at unload),
    and loads the longest stored prefix of a prompt that memory does not hold."""

    def __init__(self, store: SpillStore, layers: int) -> None:
        self.store = store
        self._layers = layers

    @classmethod
    def open(
        cls, path: Path, options: LoadOptions, layers: int, *, trimmable: bool = True
    ) -> MLXSpill | None:
        """The model's spill, or None when spilling is off (see :func:`open_store`);
        ``trimmable`` false for a model whose entries are checkpoints (each serves only a
        prompt holding it whole)."""
        files = [path / "config.json", *path.glob("*.safetensors")]
        kv = {"format": "mlx", "f32": options.kv_cache_f32, "bits": options.kv_cache_bits}
        store = open_store(options, path.name, files, kv, trimmable=trimmable)
        return cls(store, layers) if store is not None else None

    def save(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Queue ``cache`` (a prompt-cache entry: evaluated, compacted; or a checkpoint, which
        holds exactly ``tokens``) for writing."""
        n = len(tokens) if not self.store.trimmable else getattr(cache[0], "offset", 0)
        if not n or len(tokens) < n or not self.store.wants(tokens[:n]):
            return
        arrays: dict[str, mx.array] = {}
        layers: list[dict[str, Any]] = []
        for i, c in enumerate(cache):
            layer = _layer(i, c, arrays)
            if layer is None:
                return
            layers.append(layer)
        # Row-contiguous and evaluated here (no copy for what already is): the writer thread
        # must find nothing left to compute.
        arrays = {k: mx.contiguous(a) for k, a in arrays.items()}
        mx.eval(*arrays.values())

        # Evaluated arrays are immutable values: the writer thread only reads their memory.
        def write(f: Any) -> None:
            mx.save_safetensors(f, arrays)

        self.store.put(tokens[:n], {"offset": n, "layers": layers}, write)

    def fetch(self, prompt: Sequence[int], have: int) -> tuple[list[Any] | None, int]:
        """A cache for the longest stored prefix of ``prompt`` if it is longer than ``have``
        (what memory holds), and its length; (None, 0) otherwise or if the file is bad."""
        key, n = self.store.longest(prompt, have)
        if key is None:
            return None, 0
        got = self.store.read(key)
        if got is None:
            return None, 0
        meta, payload = got
        try:
            cache = self._restore(meta, payload, n)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.warning("prompt cache file for %d tokens dropped: %s", len(key), exc)
            self.store.discard(key)
            return None, 0
        return cache, n

    def _restore(self, meta: dict[str, Any], payload: memoryview, n: int) -> list[Any]:
        arrays = mx.load(io.BytesIO(payload), format="safetensors")
        assert isinstance(arrays, dict)
        layers = meta["layers"]
        if len(layers) != self._layers or int(meta["offset"]) < n:
            raise ValueError("it does not fit this model")
        cache = [_restored(i, layer, arrays, n) for i, layer in enumerate(layers)]
        mx.eval(*[a for c in cache for a in _layer_arrays(c)])
        return cache

    def close(self) -> None:
        """Finish the queued writes."""
        self.store.close()
