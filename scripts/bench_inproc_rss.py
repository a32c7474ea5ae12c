"""The in-process baseline of scripts/bench.py's peak-RSS figure, run as its own bare process:
it imports nothing but the engine's library (mlx-lm or llama-cpp-python), loads the model and
generates the replies its job on stdin asks for, then prints its peak resident bytes as JSON.
Nothing of the bench (httpx, the servers' helpers) is in it, so the figure is what a user's
own script would hold."""

from __future__ import annotations

import json
import resource
import sys
from typing import Any


def run(job: dict[str, Any]) -> None:
    prompts: list[str] = job["prompts"]
    if job["format"] == "mlx":
        from mlx_lm import batch_generate, load

        model, tokenizer = load(job["path"])[:2]
        batch_generate(
            model, tokenizer, [tokenizer.encode(p) for p in prompts], max_tokens=job["tokens"]
        )
        return
    import llama_cpp
    from llama_cpp import Llama

    kv = llama_cpp.GGML_TYPE_F32 if job["kv_f32"] else llama_cpp.GGML_TYPE_F16
    llm = Llama(
        job["path"],
        n_ctx=job["context"],
        n_threads=job["threads"],
        n_threads_batch=job["threads_batch"],
        type_k=kv,
        type_v=kv,
        verbose=False,
    )
    for p in prompts:
        ids = llm.tokenize(p.encode(), add_bos=False)
        for i, _ in enumerate(llm.generate(ids, temp=0.0, reset=True)):
            if i + 1 >= job["tokens"]:
                break


def main() -> None:
    run(json.load(sys.stdin))
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}))


if __name__ == "__main__":
    main()
