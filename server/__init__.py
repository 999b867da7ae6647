"""gradserve's gRPC server, on the wire layer and the engine (never the client):

- ``app``: the running server, its lifecycle and graceful shutdown; ``config``: its settings;
- ``service``: the GradientService's RPCs; ``handlers``: registering them with gRPC;
- ``batcher``: dynamic batching of requests into engine passes; ``offload``: work off the event
  loop, and how it stops once nobody wants it; ``budget``: a stream's bytes of answers;
- ``plans``: the cache of compiled plans (registered graphs); ``security``: TLS and tokens;
- ``metrics``: Prometheus; ``workers``: several server processes on one port.
"""
