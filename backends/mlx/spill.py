"""The MLX prompt cache's entries on disk (see :mod:`backends.spill`): per-layer KV, plain
or quantized, as safetensors."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from backends.base import LoadOptions
from backends.mlx.kvquant import QuantizedCache
from backends.spill import SpillStore, open_store

log = logging.getLogger("mlxserve.backends")


def _parts(x: Any) -> tuple[mx.array, ...]:
    return x if isinstance(x, tuple) else (x,)


class MLXSpill:
    """Writes prompt-cache entries the memory budget pushes out (and all of them at unload),
    and loads the longest stored prefix of a prompt that memory does not hold."""

    def __init__(self, store: SpillStore, layers: int) -> None:
        self.store = store
        self._layers = layers

    @classmethod
    def open(cls, path: Path, options: LoadOptions, layers: int) -> MLXSpill | None:
        """The model's spill, or None when spilling is off (see :func:`open_store`)."""
        files = [path / "config.json", *path.glob("*.safetensors")]
        kv = {"format": "mlx", "f32": options.kv_cache_f32, "bits": options.kv_cache_bits}
        store = open_store(options, path.name, files, kv)
        return cls(store, layers) if store is not None else None

    def save(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Queue ``cache`` (a prompt-cache entry: evaluated, compacted) for writing; only
        plain or quantized KV (checkpoints of recurrent or sliding-window layers stay in
        memory)."""
        if not all(type(c) in (KVCache, QuantizedCache) for c in cache):
            return
        n = cache[0].offset
        if len(tokens) < n or not self.store.wants(tokens[:n]):
            return
        arrays: dict[str, mx.array] = {}
        layers: list[dict[str, int]] = []
        for i, c in enumerate(cache):
            layers.append(
                {"bits": c.bits, "group_size": c.group_size}
                if isinstance(c, QuantizedCache)
                else {}
            )
            for name, x in (("k", c.keys), ("v", c.values)):
                for j, a in enumerate(_parts(x)):
                    arrays[f"{i}.{name}.{j}"] = mx.contiguous(a)
        # Row-contiguous and evaluated here (no copy for what already is): the writer thread
        # must find nothing left to compute.
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
        cache: list[Any] = []
        for i, layer in enumerate(layers):
            parts = 3 if layer else 1

            def read(name: str, i: int = i, parts: int = parts) -> Any:
                got = tuple(arrays[f"{i}.{name}.{j}"][..., :n, :] for j in range(parts))
                return got if parts > 1 else got[0]

            c: Any = (
                QuantizedCache(group_size=int(layer["group_size"]), bits=int(layer["bits"]))
                if layer
                else KVCache()
            )
            c.keys, c.values = read("k"), read("v")
            c.offset = n
            cache.append(c)
        mx.eval(*[a for c in cache for x in (c.keys, c.values) for a in _parts(x)])
        return cache

    def close(self) -> None:
        """Finish the queued writes."""
        self.store.close()
