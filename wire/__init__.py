"""gradserve's wire layer: the gradserve.v1 contract (protobuf messages, gRPC statuses) to the
engine's own types and back, for the server and the client alike.

It imports the engine, the ONNX importer and the generated ``gradserve.v1`` code, and nothing
of the server or the client, which both import it:

- ``tensors``: Tensor messages to numpy arrays and back; ``bulk``: large tensors without copies;
- ``graphs``: Graph messages to engine graphs and back;
- ``models``: OnnxModel messages imported as engine graphs, and graph signatures;
- ``derivatives``: which derivative beyond the gradient a request asks for, and its answer;
- ``requests``: building ComputeRequests, and decoding received ones without ever raising;
- ``responses``: results into ComputeResponses, and back into arrays (``Gradients``);
- ``status``: refusals as rich gRPC statuses (``RequestError``), and reading them back;
- ``ops``: the op table as OpInfo messages.
"""
