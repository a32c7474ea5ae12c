"""LM Studio's SDK protocol: the websocket RPC API that the official ``lmstudio`` Python and
``@lmstudio/sdk`` TypeScript clients (and the ``lms`` CLI) speak, one socket per namespace
(``/llm``, ``/embedding``, ``/system``, ...), mapped onto the same core as the REST APIs."""
