"""How far a result lands from what it should be, as the tests state their bounds."""


def rel(a, b) -> float:
    """``||a - b|| / ||b||`` over the whole tensor."""
    return ((a - b).norm() / b.norm()).item()


def worst_rel(a, b) -> float:
    """The largest per-item ``||a - b|| / ||b||`` over the batch."""
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()
