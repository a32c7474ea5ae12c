"""The registry's scan cache: a listing with nothing changed walks no model folder, and each
kind of change (a new model, files changed inside one, a deletion, invalidate) is seen."""

import asyncio
import shutil

from mlxserve.core.registry import Registry
from tests.test_registry import make_gguf, make_mlx


def _counting(registry: Registry) -> list[int]:
    calls = [0]
    scan = registry._scan

    def counted():
        calls[0] += 1
        return scan()

    registry._scan = counted  # type: ignore[method-assign]
    return calls


def test_an_unchanged_folder_is_listed_from_the_cache(tmp_path):
    make_mlx(tmp_path / "acme" / "one")
    registry = Registry(tmp_path)
    calls = _counting(registry)
    first = registry.scan()
    assert registry.scan() is first and registry.get("acme/one") is not None
    assert asyncio.run(registry.models()) is first
    assert calls[0] == 1


def test_new_changed_and_deleted_models_are_seen(tmp_path):
    root = tmp_path / "models"
    make_mlx(root / "acme" / "one")
    registry = Registry(root)
    calls = _counting(registry)
    assert [m.key for m in registry.scan()] == ["acme/one"]

    make_gguf(root / "acme" / "two" / "two-f32.gguf")  # new model, existing publisher
    make_mlx(root / "other" / "three")  # new publisher
    assert [m.key for m in registry.scan()] == ["acme/one", "acme/two", "other/three"]

    # A folder created empty, then filled (a copy in progress): seen once its files are there.
    (root / "acme" / "four").mkdir()
    assert "acme/four" not in {m.key for m in registry.scan()}
    make_gguf(tmp_path / "staging" / "four-f32.gguf")
    (tmp_path / "staging" / "four-f32.gguf").rename(root / "acme" / "four" / "four-f32.gguf")
    assert "acme/four" in {m.key for m in registry.scan()}

    shutil.rmtree(root / "acme" / "two")
    assert "acme/two" not in {m.key for m in registry.scan()}
    assert calls[0] == 5


def test_invalidate_rescans(tmp_path):
    make_mlx(tmp_path / "acme" / "one")
    registry = Registry(tmp_path)
    calls = _counting(registry)
    registry.scan()
    registry.invalidate()
    registry.scan()
    assert calls[0] == 2


def test_concurrent_listings_share_one_scan(tmp_path):
    for i in range(5):
        make_gguf(tmp_path / "acme" / f"m{i}" / "m-f32.gguf")
    registry = Registry(tmp_path)
    calls = _counting(registry)

    async def many():
        return await asyncio.gather(*(registry.models() for _ in range(20)))

    results = asyncio.run(many())
    assert all(len(r) == 5 for r in results) and calls[0] == 1
