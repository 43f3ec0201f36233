"""Per-query comparisons: win/tie/loss counts, a paired randomisation test, query splits."""

from __future__ import annotations

import hashlib

import numpy as np

SAMPLES = 10_000
TIE_TOLERANCE = 1e-9


def paired(base: dict[str, float], other: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The two scores of every query in ``base``; a query missing from ``other`` scores 0."""
    qids = sorted(base)
    return (
        np.array([base[q] for q in qids], dtype=np.float64),
        np.array([other.get(q, 0.0) for q in qids], dtype=np.float64),
    )


def wins_ties_losses(base: np.ndarray, other: np.ndarray) -> tuple[int, int, int]:
    diff = other - base
    wins = int((diff > TIE_TOLERANCE).sum())
    losses = int((diff < -TIE_TOLERANCE).sum())
    return wins, len(diff) - wins - losses, losses


def randomization_test(
    base: np.ndarray, other: np.ndarray, samples: int = SAMPLES, seed: int = 0
) -> float:
    """Two-sided p-value of a paired sign-flip randomisation test on the mean difference.

    Under the null hypothesis each query's two scores are exchangeable, so the sign of each
    difference is a coin flip; p = (#{|mean of flipped| ≥ |observed|} + 1) / (samples + 1).
    """
    diff = other - base
    if len(diff) == 0 or not np.any(np.abs(diff) > TIE_TOLERANCE):
        return 1.0
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, samples, 1000):  # chunks keep memory at 1000 × queries
        signs = rng.choice((-1.0, 1.0), size=(min(1000, samples - start), len(diff)))
        extreme += int((np.abs(signs @ diff) / len(diff) >= observed - 1e-12).sum())
    return (extreme + 1) / (samples + 1)


def compare(base: dict[str, float], other: dict[str, float], seed: int = 0) -> dict:
    """Win/tie/loss of ``other`` against ``base`` over base's queries, and the test's p-value."""
    a, b = paired(base, other)
    wins, ties, losses = wins_ties_losses(a, b)
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "p_value": randomization_test(a, b, seed=seed),
    }


def query_split(qids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (tuning, evaluation) split of query ids, independent of their order.

    Queries are ordered by a hash of (seed, id) and the first ``fraction`` of them tune; both
    parts get at least one query when there are two or more.
    """

    def key(qid: str) -> str:
        return hashlib.sha256(f"{seed}\0{qid}".encode()).hexdigest()

    ordered = sorted(set(qids), key=key)
    n_tune = min(max(round(fraction * len(ordered)), 1), len(ordered) - 1)
    return sorted(ordered[:n_tune]), sorted(ordered[n_tune:])
