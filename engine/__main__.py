"""``python -m gradserve.engine``: the seed examples, computed by the engine (a quick demo)."""

from __future__ import annotations

from gradserve.engine import Plan
from gradserve.engine.builder import GraphBuilder


def main() -> None:
    g = GraphBuilder()
    x = g.input("x")
    f = 2 * x**2 - 3 * x + 4
    plan = Plan(g.build(f))
    for value in (2.0, 6.0, -2.0):
        r = plan.run({"x": value})
        print(f"f(x) = 2x^2 - 3x + 4 at x={value:g}: f={r.outputs[f.name]:g}, "
              f"df/dx={r.gradients['x']:g}")

    g = GraphBuilder()
    a, b, c, fv = (g.input(n) for n in "abcf")
    loss = g.op("mul", g.op("add", g.op("mul", a, b, name="d"), c, name="e"), fv, name="L")
    r = Plan(g.build(loss)).run({"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0})
    grads = ", ".join(f"dL/d{k}={v:g}" for k, v in r.gradients.items())
    print(f"L = (a*b + c) * f at a=3, b=-2, c=8, f=-2: L={r.outputs['L']:g}; {grads}")

    g = GraphBuilder()
    x, y = g.input("x"), g.input("y")
    staged = (x + y.sigmoid()) / (x.sigmoid() + (x + y) ** 2)
    r = Plan(g.build(staged)).run({"x": 3.0, "y": -4.0})
    print(f"f = (x + sigmoid(y)) / (sigmoid(x) + (x+y)^2) at x=3, y=-4: "
          f"f={r.outputs[staged.name]:.6f}, df/dx={r.gradients['x']:.6f}, "
          f"df/dy={r.gradients['y']:.6f}")


if __name__ == "__main__":
    main()
