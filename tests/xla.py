"""XLA's analyses of compiled computations, for the tests' cost checks."""


def flops(compiled) -> float:
    """XLA's FLOP count of a compiled computation (a loop body counted once)."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]
