"""The HTTP edge: error rendering per dialect, the middleware stack (host guard, CORS, auth,
request log, body limit, graceful shutdown) and SSE framing. :mod:`mlxserve.app` assembles
it; it never imports :mod:`mlxserve.routes`."""
