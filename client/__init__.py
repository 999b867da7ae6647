"""gradserve's client side, on the wire layer and the engine (never the server):

- ``api``: the Python client, ``GradientClient`` and ``AsyncGradientClient``;
- ``credentials``: TLS and bearer tokens for a channel;
- ``expr``: the expression language of ``gradserve grad``; ``dot``: drawing a computed graph;
- ``loadtest``, ``loadreport`` and ``workloads``: driving a server and reporting like ghz.
"""
