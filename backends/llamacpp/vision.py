"""llama.cpp's multimodal path (mtmd) for GGUF vision models: the projector
(``mmproj-*.gguf``) that lies next to the model in its folder, as LM Studio and llama-server
lay them out."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import weakref
from dataclasses import dataclass
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


@dataclass
class Image:
    """One image of a prompt: its mtmd chunk, the cells it takes in the prompt
    (``start``..``start + n``), the positions it advances (fewer than ``n`` on M-RoPE
    models), and while it is being evaluated its encoded embeddings and how many of them
    are decoded."""

    index: int
    start: int
    n: int
    n_pos: int
    embd: np.ndarray | None = None
    done: int = 0

    @property
    def shift(self) -> int:
        """Cells minus positions this image adds."""
        return self.n - self.n_pos


class Chunks:
    """A tokenized prompt with images (mtmd input chunks), freed once."""

    def __init__(self, handle: Any) -> None:
        from llama_cpp import mtmd_cpp

        self.handle = handle
        self.images: list[Image] = []
        self._free = weakref.finalize(self, mtmd_cpp.mtmd_input_chunks_free, handle)

    def free(self) -> None:
        self._free()
        for image in self.images:
            image.embd = None

    def shift_at(self, cell: int) -> int:
        """Cells minus positions of the images that end at or before ``cell``."""
        return sum(i.shift for i in self.images if i.start + i.n <= cell)

    def boundary(self, cell: int) -> int:
        """``cell``, or the start of the image it falls inside: a reused prefix ends there."""
        for i in self.images:
            if i.start < cell < i.start + i.n:
                return i.start
        return cell


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
        self._model = model
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
                n_pos = mtmd.mtmd_input_chunk_get_n_pos(chunk)
                chunks.images.append(Image(i, len(tokens), n, n_pos))
                tokens += [next(marks, -1)] * n
                n_image += n
        if chunks.images and chunks.images[-1].start + chunks.images[-1].n == len(tokens):
            chunks.free()
            raise ValueError("a prompt cannot end with an image")
        return VisionPrompt(tuple(tokens), chunks, n_image)

    def encode(self, chunks: Chunks, image: Image) -> None:
        """Run the vision encoder on ``image``; its embeddings are kept with it (mtmd's
        output buffer is overwritten by the next image, maybe another request's)."""
        mtmd = self._mtmd
        chunk = mtmd.mtmd_input_chunks_get(chunks.handle, image.index)
        rc = mtmd.mtmd_encode_chunk(self.ctx, chunk)
        if rc != 0:
            raise RuntimeError(f"encoding an image failed ({rc})")
        width = llama_cpp.llama_model_n_embd_inp(self._model)
        out = mtmd.mtmd_get_output_embd(self.ctx)
        image.embd = np.ctypeslib.as_array(out, shape=(image.n, width)).copy()

    def whole(self, chunks: Chunks, image: Image) -> bool:
        """Whether ``image`` is decoded whole: the model attends to it non-causally."""
        chunk = self._mtmd.mtmd_input_chunks_get(chunks.handle, image.index)
        return bool(self._mtmd.mtmd_decode_use_non_causal(self.ctx, chunk))

    def decode(
        self, lctx: Any, chunks: Chunks, image: Image, seq: int, pos_0: int, limit: int
    ) -> int:
        """Decode the next at most ``limit`` embeddings of the encoded ``image`` (whose first
        position is ``pos_0``) into sequence ``seq``; returns how many. An image the model
        attends to non-causally is decoded whole, as mtmd's own helper does."""
        mtmd = self._mtmd
        assert image.embd is not None
        chunk = mtmd.mtmd_input_chunks_get(chunks.handle, image.index)
        non_causal = self.whole(chunks, image)
        n = image.n - image.done if non_causal else min(limit, image.n - image.done)
        tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
        mrope = bool(mtmd.mtmd_decode_use_mrope(self.ctx))
        pos = (llama_cpp.llama_pos * 4)()
        width = image.embd.shape[1]
        if non_causal:
            llama_cpp.llama_set_causal_attn(lctx, False)
        try:
            at = image.done
            while at < image.done + n:
                batch = llama_cpp.llama_batch_ext_init(lctx)
                try:
                    room = llama_cpp.llama_n_batch(lctx)
                    for i in range(at, min(at + room, image.done + n)):
                        row = image.embd[i]
                        data = row.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                        idx = llama_cpp.llama_batch_ext_add_embd(
                            batch, seq, llama_cpp.llama_embd(data, 1, width)
                        )
                        if idx < 0:
                            raise RuntimeError(f"cannot add an image embedding ({idx})")
                        if mrope:
                            p = mtmd.mtmd_image_tokens_get_decoder_pos(tokens, pos_0, i)
                            pos[0], pos[1], pos[2], pos[3] = p.t, p.y, p.x, p.z
                        else:
                            pos[0] = pos_0 + i
                        llama_cpp.llama_batch_ext_set_pos(batch, idx, pos)
                        at = i + 1
                    rc = llama_cpp.llama_process(lctx, llama_cpp.LLAMA_PROCESS_TYPE_DECODE, batch)
                finally:
                    llama_cpp.llama_batch_ext_free(batch)
                if rc != 0:
                    raise RuntimeError(f"decoding an image failed ({rc})")
        finally:
            if non_causal:
                llama_cpp.llama_set_causal_attn(lctx, True)
        image.done += n
        if image.done == image.n:
            image.embd = None
        return n
