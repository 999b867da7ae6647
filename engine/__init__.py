"""gradserve's engine: reverse-mode autodiff over numpy, with no knowledge of the wire format.

Build a :class:`Graph`, compile it into a :class:`Plan` (which validates it and infers every
shape), then ``plan.run(inputs)`` for outputs and gradients. A plan also runs on many examples
stacked on a leading axis (``batched=True``), which is how the server batches requests.
"""

from gradserve.engine.errors import Cancelled, EngineError, ErrorKind
from gradserve.engine.feeds import Feed, Timer
from gradserve.engine.gradcheck import GradcheckReport, InputCheck, gradcheck
from gradserve.engine.graph import Constant, Graph, Input, Node
from gradserve.engine.ops import OP_TABLE, AttrKind, AttrSpec, OpDef
from gradserve.engine.plan import Plan, structural_key
from gradserve.engine.results import Result
from gradserve.engine.types import DType, TensorType
from gradserve.engine.validate import Limits

__all__ = [
    "OP_TABLE",
    "AttrKind",
    "AttrSpec",
    "Cancelled",
    "Constant",
    "DType",
    "EngineError",
    "ErrorKind",
    "Feed",
    "GradcheckReport",
    "Graph",
    "Input",
    "InputCheck",
    "Limits",
    "Node",
    "OpDef",
    "Plan",
    "Result",
    "TensorType",
    "Timer",
    "gradcheck",
    "structural_key",
]
