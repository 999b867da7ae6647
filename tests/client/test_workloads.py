"""The built-in workloads: each graph's gradients agree with finite differences at inputs it
draws, batches stack examples, and the seeds compute the values the backprop notes give."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from gradserve.client import networks
from gradserve.client.workloads import WORKLOADS, Workload, from_model, mlp
from gradserve.engine import Plan, gradcheck


def small_mlp() -> Workload:
    return mlp(batch=4, hidden=3, features=5, classes=3)


# The models in float64, where finite differences and exact batching can be checked tightly.
SMALL: dict[str, Callable[[], Workload]] = {
    **WORKLOADS, "mlp": small_mlp,
    "cnn": lambda: from_model(networks.cnn(dtype=np.float64), "cnn", "LeNet-5"),
    "transformer": lambda: from_model(networks.transformer(dtype=np.float64), "transformer",
                                      "an encoder block"),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_agree_with_finite_differences(name: str) -> None:
    workload: Workload = SMALL[name]()
    inputs = workload.inputs(np.random.default_rng(3), None)
    assert gradcheck(workload.graph, inputs).ok


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_batch_computes_each_example_as_if_alone(name: str) -> None:
    workload = SMALL[name]()
    plan = Plan(workload.graph)
    batch = workload.inputs(np.random.default_rng(4), 3)
    together = plan.run(batch, batched=True)
    for k in range(3):
        alone = plan.run({n: v[k] for n, v in batch.items()})
        for grad_name, grad in alone.gradients.items():
            np.testing.assert_allclose(together.gradients[grad_name][k], grad, rtol=1e-12)


def test_the_seeds_give_the_notes_values() -> None:
    quadratic, loss = Plan(WORKLOADS["quadratic"]().graph), Plan(WORKLOADS["loss-l"]().graph)
    r = quadratic.run({"x": 2.0})
    assert (float(r.outputs[quadratic.outputs[0]]), float(r.gradients["x"])) == (6.0, 5.0)
    r = loss.run({"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0})
    assert {k: float(v) for k, v in r.gradients.items()} == {"a": 4.0, "b": -6.0, "c": -2.0,
                                                              "f": 2.0}
