"""Real models exported from PyTorch, imported, and differentiated: outputs and gradients with
respect to the inputs and to every weight match torch.autograd (float64 to rtol 1e-7, float32 to
1e-4), for one example and for a batch (each example as the model run on it alone).

Each model is exported once per session and dtype with the default exporter (dynamo, opset 18 and
up) and with ``dynamo=False`` (TorchScript): an MLP with cross-entropy, a LeNet-style CNN with
BatchNorm (eval) and max-pooling, a transformer encoder layer over an embedding. The weights are
drawn at random, so no two are equal (an exporter would merge equal initializers).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
import torch  # the oracle; the test command (.ci/test) installs its CPU build

from gradserve.engine import Plan
from gradserve.importer import import_model

nn = torch.nn
F = torch.nn.functional
Module: Any = nn.Module

Arr = Any
B = 3  # examples in a batched run


class MLP(Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: Any, y: Any) -> Any:
        return F.cross_entropy(self.l2(torch.relu(self.l1(x))), y)


class LeNet(Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.fc = nn.Conv2d(4, 6, 3), nn.Linear(6 * 3 * 3, 10)

    def forward(self, x: Any) -> Any:
        x = F.max_pool2d(torch.relu(self.bn(self.c1(x))), 2)
        x = F.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class Encoder(Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, t: Any, pos: Any) -> Any:
        return self.head(self.layer(self.emb(t) + pos).mean(1))


@dataclass(frozen=True)
class Spec:
    """A model to export and how to draw its inputs for a batch of ``n``."""

    make: Callable[[], Any]
    inputs: Callable[[np.random.Generator, int], dict[str, Arr]]
    fold_bn: bool = False  # export with constant folding (BatchNorm folded into the conv)


SPECS: Mapping[str, Spec] = {
    "mlp": Spec(MLP, lambda rng, n: {"x": rng.standard_normal((n, 8)),
                                     "y": rng.integers(0, 4, n)}),
    "lenet": Spec(LeNet, lambda rng, n: {"x": rng.standard_normal((n, 1, 16, 16))}),
    "lenet-folded": Spec(LeNet, lambda rng, n: {"x": rng.standard_normal((n, 1, 16, 16))},
                         fold_bn=True),
    "encoder": Spec(Encoder, lambda rng, n: {"t": rng.integers(0, 20, (n, 5)),
                                             "pos": rng.standard_normal((n, 5, 16))}),
}


@dataclass(frozen=True)
class Exported:
    module: Any
    model: onnx.ModelProto
    spec: Spec
    dtype: Any

    def feed(self, rng: np.random.Generator, n: int) -> dict[str, Arr]:
        return {k: v.astype(self.dtype) if v.dtype.kind == "f" else v
                for k, v in self.spec.inputs(rng, n).items()}


def export(spec: Spec, dynamo: bool, dtype: Any) -> Exported:
    torch.manual_seed(0)
    module = spec.make().to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    module.eval()
    example = tuple(torch.from_numpy(v) for v in
                    Exported(module, onnx.ModelProto(), spec, dtype).feed(
                        np.random.default_rng(0), 2).values())
    names = list(spec.inputs(np.random.default_rng(0), 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(module, example, dynamo=True, input_names=names,
                                        dynamic_shapes={k: {0: batch} for k in names},
                                        optimize=spec.fold_bn, verbose=False)
            assert program is not None
            model = program.model_proto
        else:
            buffer = io.BytesIO()
            # the TorchScript exporter writes to a file object too, though the stubs say paths
            torch.onnx.export(module, example, buffer,  # type: ignore[arg-type]
                              dynamo=False, input_names=names,
                              dynamic_axes={k: {0: "batch"} for k in names},
                              do_constant_folding=spec.fold_bn)
            model = onnx.load_from_string(buffer.getvalue())
    return Exported(module, model, spec, dtype)


@pytest.fixture(scope="module", params=[
    pytest.param((name, dynamo, dtype), id=f"{name}-{'dynamo' if dynamo else 'torchscript'}-"
                                           f"{np.dtype(dtype).name}")
    for name in SPECS for dynamo in (True, False) for dtype in (np.float64, np.float32)])
def exported(request: pytest.FixtureRequest) -> Iterator[Exported]:
    name, dynamo, dtype = request.param
    yield export(SPECS[name], dynamo, dtype)


def weights(ex: Exported) -> dict[str, tuple[str, bool]]:
    """Each initializer that holds a parameter: the parameter's name, and whether it holds it
    transposed (exporters store a Linear's weight for MatMul so)."""
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in ex.model.graph.initializer}
    found: dict[str, tuple[str, bool]] = {}
    for pname, p in ex.module.named_parameters():
        value = p.detach().numpy()
        for name, a in arrays.items():
            if a.shape == value.shape and np.array_equal(a, value):
                found[name] = (pname, False)
            elif a.ndim == 2 and a.shape == value.T.shape and np.array_equal(a, value.T):
                found[name] = (pname, True)
    return found


def torch_run(ex: Exported, feed: Mapping[str, Arr], upstream: Arr | None
              ) -> tuple[Arr, dict[str, Arr], dict[str, Arr]]:
    """The module's output on ``feed`` and the gradients of <upstream, output> with respect
    to its float inputs and its parameters."""
    ex.module.zero_grad()
    args = {k: torch.tensor(v, requires_grad=v.dtype.kind == "f") for k, v in feed.items()}
    out = ex.module(*args.values())
    (out * torch.from_numpy(np.asarray(upstream)) if upstream is not None else out).sum().backward()
    inputs = {k: a.grad.numpy() for k, a in args.items() if a.grad is not None}
    params = {k: p.grad.numpy() for k, p in ex.module.named_parameters()}
    return out.detach().numpy(), inputs, params


def param_grads(grads: Mapping[str, Arr], mapping: Mapping[str, tuple[str, bool]]
                ) -> dict[str, Arr]:
    """The engine's gradients of the initializers, summed per parameter (transposed back)."""
    out: dict[str, Arr] = {}
    for init, (pname, transposed) in mapping.items():
        g = grads[init]
        if transposed:
            g = np.swapaxes(g, -1, -2)
        out[pname] = out.get(pname, 0) + g
    return out


def close(got: Arr, want: Arr, dtype: Any, what: str) -> None:
    """Equal to float64's rtol 1e-7 or float32's 1e-4 (with an atol for values near 0)."""
    rtol, atol = (1e-7, 1e-9) if dtype == np.float64 else (1e-4, 1e-5)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


def test_gradients_match_torch_for_one_example_and_a_batch(exported: Exported) -> None:
    mapping = weights(exported)
    if not exported.spec.fold_bn:
        assert {p for p, _ in mapping.values()} == \
            {n for n, _ in exported.module.named_parameters()}, "a weight is not an initializer"
    imported = import_model(exported.model, inputs=list(mapping))
    assert imported.batched
    plan = Plan(imported.graph)
    computed = [plan.types[plan.slot[n.name]] for n in imported.graph.nodes]
    assert all(t.dtype.is_float for t in computed), "shape arithmetic left in the engine graph"
    (output,) = imported.outputs
    rng = np.random.default_rng(1)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in exported.model.graph.initializer}
    dtype = exported.dtype
    batch = exported.feed(rng, B)
    ups = rng.standard_normal((B, *plan.types[plan.slot[output.name]].shape)).astype(dtype)
    stacked = {k: np.stack([arrays[k]] * B) for k in mapping}
    got = plan.run({**batch, **stacked}, upstream={output.name: ups}, batched=True)
    for b in range(B):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        up = ups[b][None] if output.shape[:1] == (None,) else ups[b]
        want, want_inputs, want_params = torch_run(exported, one, up)
        single = plan.run({**{k: v[0] for k, v in one.items()},
                           **{k: arrays[k] for k in mapping}}, upstream={output.name: ups[b]})
        for result, index in ((single, ()), (got, (b,))):
            close(result.outputs[output.name][index],
                  want[0] if output.shape[:1] == (None,) else want, dtype, output.name)
            for name, g in want_inputs.items():
                close(result.gradients[name][index], g[0], dtype, name)
            per_param = param_grads({k: result.gradients[k][index] for k in mapping}, mapping)
            for pname, g in per_param.items():
                close(g, want_params[pname], dtype, pname)


def test_a_loss_over_a_batch_is_the_mean_of_the_examples_losses() -> None:
    """The MLP's cross-entropy averages over N: the model's loss on a batch of B is the mean
    of the engine's per-example losses, its gradient the mean of their weight gradients."""
    ex = export(SPECS["mlp"], True, np.float64)
    mapping = weights(ex)
    plan = Plan(import_model(ex.model, inputs=list(mapping)).graph)
    feed = ex.feed(np.random.default_rng(2), 5)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in ex.model.graph.initializer}
    got = plan.run({**feed, **{k: np.stack([arrays[k]] * 5) for k in mapping}}, batched=True)
    loss, inputs, params = torch_run(ex, feed, None)
    (name,) = plan.outputs
    np.testing.assert_allclose(got.outputs[name].mean(), loss, rtol=1e-12)
    np.testing.assert_allclose(got.gradients["x"] / 5, inputs["x"], rtol=1e-10)
    for pname, g in param_grads({k: got.gradients[k].mean(axis=0) for k in mapping},
                                mapping).items():
        np.testing.assert_allclose(g, params[pname], rtol=1e-10, err_msg=pname)
