"""Per-sequence RoPE shifts in mlx-lm's batch caches (backends/mlx/rope_shift.py): a shift a
request's cache carries into the batch moves only its own positions, and survives the batch
taking in more requests and letting finished ones go."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from backends.mlx.kvquant import QuantizedCache
from backends.mlx.rope_shift import shift


def _filled(kind: str, n: int) -> object:
    c: object = KVCache() if kind == "plain" else QuantizedCache(group_size=32, bits=8)
    if n:
        keys = mx.random.normal((1, 2, n, 32))
        c.update_and_fetch(keys, keys)  # type: ignore[attr-defined]
    return c


def _offsets(batch: object) -> list[int]:
    return batch.offset.tolist()  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["plain", "quantized"])
def test_a_shift_moves_only_its_sequence_through_merge_extend_filter_and_extract(kind):
    text, image = _filled(kind, 5), _filled(kind, 9)
    # Whichever request comes first, its cache's merge applies every request's shift.
    for order in ((text, image), (image, text)):
        layers = [shift([c], -4 if c is image else 0)[0] for c in order]
        batch = type(layers[0]).merge(layers)
        want = [5 if c is text else 9 - 4 for c in order]
        assert _offsets(batch) == want and batch.size() == 9
    batch = type(layers[0]).merge(layers)  # (image, text): offsets [5, 5]
    keys = mx.random.normal((2, 2, 1, 32))
    batch.update_and_fetch(keys, keys)
    assert _offsets(batch) == [6, 6]
    late = shift([_filled(kind, 3)], 7)[0]
    batch.extend(type(late).merge([late]))
    assert _offsets(batch) == [6, 6, 10]
    batch.filter([0, 2])
    assert _offsets(batch) == [6, 10]
    # What the batch hands back holds the positions written, as a plain request cache.
    out = batch.extract(0)
    assert type(out) is type(image) and out.offset == 10


def test_a_layer_that_cannot_shift_is_refused_unless_the_shift_is_zero():
    from mlx_lm.models.cache import RotatingKVCache

    window = RotatingKVCache(max_size=8)
    assert shift([window], 0) == [window]
    with pytest.raises(ValueError):
        shift([window], -3)
