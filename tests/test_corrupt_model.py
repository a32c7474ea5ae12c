"""A model file whose header reads fine but whose weights are cut off fails its load with a
clear error that names no filesystem path, and the server keeps serving."""

import threading

import gguf
import numpy as np
from starlette.testclient import TestClient

from mlxserve.app import create_app
from mlxserve.settings import Settings


def test_truncated_gguf_fails_cleanly(tmp_path):
    folder = tmp_path / "acme" / "broken-gguf"
    folder.mkdir(parents=True)
    path = folder / "broken.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_tensor("token_embd.weight", np.zeros((256, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4096])

    app = create_app(Settings(home=tmp_path / "home", models_dir=tmp_path))
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(3):
            r = client.post(
                "/v1/chat/completions",
                json={"model": "acme/broken-gguf", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 500
            err = r.json()["error"]
            assert err["code"] == "model_load_failed"
            assert str(tmp_path) not in err["message"] and "broken.gguf" not in err["message"]
            assert r.headers["x-should-retry"] == "false"
        assert client.get("/health").json()["status"] == "ok"
        # failed loads leave no owner threads behind
        assert not [t for t in threading.enumerate() if t.name.startswith("engine:")]
