"""gradserve's client side, on the wire layer, the importer and the engine (never the server):

- ``api``: the Python client, ``GradientClient`` and ``AsyncGradientClient``, and ONNX
  models as it holds them (``load_model``, ``Model``);
- ``credentials``: TLS and bearer tokens for a channel;
- ``expr``: the expression language of ``gradserve grad``; ``dot``: drawing a computed graph;
- ``loadtest``, ``loadreport`` and ``workloads``: driving a server and reporting like ghz;
- ``networks``: small real networks (a CNN, a transformer block) as ONNX models.
"""
