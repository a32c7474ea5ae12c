"""llama.cpp's multimodal path (mtmd) for GGUF vision models: the projector
(``mmproj-*.gguf``) that lies next to the model in its folder, as LM Studio and llama-server
lay them out."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import weakref
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from backends.base import VisionPrompt
from backends.llamacpp import adapter

log = logging.getLogger("mlxserve.backends")

# llama.cpp bounds Qwen2-VL-style images to 4096 merged 28x28 patches; images are scaled
# down to that before preprocessing when the projector names no limit of its own.
DEFAULT_MAX_PIXELS = 4096 * 28 * 28


def find_projector(model_file: Path) -> Path | None:
    """The projector beside a GGUF model: ``mmproj*.gguf`` in its folder (the first by name)."""
    found = sorted(p for p in model_file.parent.glob("mmproj*.gguf") if p.is_file())
    return found[0] if found else None


class Chunks:
    """A tokenized prompt with images (mtmd input chunks), freed once."""

    def __init__(self, handle: Any) -> None:
        from llama_cpp import mtmd_cpp

        self.handle = handle
        self._free = weakref.finalize(self, mtmd_cpp.mtmd_input_chunks_free, handle)

    def free(self) -> None:
        self._free()


class Projector:
    """An mtmd context over a loaded llama.cpp model. Used on the engine's owner thread."""

    def __init__(self, path: Path, model: Any, n_threads: int) -> None:
        from llama_cpp import mtmd_cpp

        self._mtmd = mtmd_cpp
        # mtmd logs every image it encodes: through llama-cpp-python's logger (errors only).
        log_callback = adapter.log_callback()
        mtmd_cpp.mtmd_log_set(log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(log_callback, ctypes.c_void_p(0))
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = True
        params.print_timings = False
        params.n_threads = n_threads
        with adapter.quiet():
            ctx = mtmd_cpp.mtmd_init_from_file(str(path).encode(), model, params)
        if not ctx:
            raise RuntimeError(f"cannot load the projector {path.name}")
        if not mtmd_cpp.mtmd_support_vision(ctx):
            mtmd_cpp.mtmd_free(ctx)
            raise RuntimeError(f"the projector {path.name} has no vision encoder")
        self.ctx = ctx
        self.marker = mtmd_cpp.mtmd_default_marker().decode()

    def close(self) -> None:
        if self.ctx:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None

    def tokenize(self, text: str, images: list[Any]) -> VisionPrompt:
        """``text`` holds one marker per image; images are RGB PIL images. An image's cells
        hold a negative mark of its pixels' hash in the returned token ids (they are
        embeddings, not tokens), so that prefix matching tells images apart."""
        mtmd = self._mtmd
        marks = iter([-1 - int(hashlib.sha256(i.tobytes()).hexdigest()[:15], 16) for i in images])
        bitmaps = []
        try:
            for image in images:
                pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
                buf = (ctypes.c_uint8 * pixels.size).from_buffer_copy(pixels.tobytes())
                bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, buf)
                if not bitmap:
                    raise RuntimeError("cannot make an image bitmap")
                bitmaps.append(bitmap)
            raw = text.encode("utf-8")
            inp = mtmd.mtmd_input_text()
            inp.text = raw
            inp.text_len = len(raw)
            inp.add_special = False
            inp.parse_special = True
            handle = mtmd.mtmd_input_chunks_init()
            if not handle:
                raise RuntimeError("cannot allocate input chunks")
            chunks = Chunks(handle)
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self.ctx, handle, ctypes.byref(inp), array, len(bitmaps))
            if rc != 0:
                chunks.free()
                raise ValueError(f"the prompt's image markers do not match its images ({rc})")
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        tokens: list[int] = []
        n_image = 0
        for i in range(mtmd.mtmd_input_chunks_size(handle)):
            chunk = mtmd.mtmd_input_chunks_get(handle, i)
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens += [int(ptr[j]) for j in range(count.value)]
            else:
                tokens += [next(marks, -1)] * n
                n_image += n
        return VisionPrompt(tuple(tokens), chunks, n_image)

    def evaluate(self, lctx: Any, chunks: Chunks, seq: int, n_batch: int) -> int:
        """Decode the whole prompt into sequence ``seq`` from position 0; returns the next
        position (M-RoPE models give an image fewer positions than embeddings)."""
        new_n_past = llama_cpp.llama_pos(0)
        try:
            rc = self._mtmd.mtmd_helper_eval_chunks(
                self.ctx, lctx, chunks.handle, 0, seq, n_batch, False, ctypes.byref(new_n_past)
            )
        finally:
            chunks.free()
        if rc != 0:
            raise RuntimeError(f"evaluating the image prompt failed ({rc})")
        return int(new_n_past.value)
