"""gradserve's ONNX importer: a model exported from PyTorch (or any ONNX producer) becomes an
engine graph, so a caller can ask for gradients of a real network with respect to its inputs
or its weights.

``import_model(model, inputs=[...initializer names...])`` returns an :class:`Imported`: the
engine :class:`~gradserve.engine.Graph`, the model's inputs and outputs, and whether its
dynamic batch axis became the engine's batch axis. What cannot be imported raises
:class:`ModelError`, naming the node, its op type and opset, and the field. The engine knows
nothing of ONNX; this package sits beside it and uses only its public graph types.
"""

from gradserve.importer.convert import Imported, TensorInfo, import_model
from gradserve.importer.errors import ModelError
from gradserve.importer.ops import CONVERTERS
from gradserve.importer.reading import MIN_OPSET, REVIEWED_OPSET

__all__ = ["CONVERTERS", "MIN_OPSET", "REVIEWED_OPSET", "Imported", "ModelError", "TensorInfo",
           "import_model"]
