"""The sparsity methods a run can train with, and what each one implies: ask the method, never its name.

    prox      palm_prox (Bui et al. 2023): BN scales coupled to a sparse copy xi; prunes the channels whose xi
              is exactly zero
    ista      soft_threshold: proximal SGD, exact zeros in the scales themselves
    ns        l1_subgradient (Network Slimming, Liu et al. 2017): prunes a global percentage of channels by
              |scale|, then fine-tunes
    baseline  plain SGD, no sparsity

Importing this module imports no JAX (`optimizer_links` imports `palm_jax.prox` when called).
"""

from __future__ import annotations

import enum


class Method(str, enum.Enum):
    """A sparsity method; a `str`, so it compares equal to its name and is written to JSON as that name."""

    PROX = "prox"
    ISTA = "ista"
    NS = "ns"
    BASELINE = "baseline"

    __str__ = str.__str__  # "prox", not "Method.PROX" (Python >= 3.12 formats mixed-in enums by name)
    __format__ = str.__format__

    @property
    def uses_l1(self) -> bool:
        """Whether the method has a sparsity weight (every method but the baseline; it must then be > 0)."""
        return self is not Method.BASELINE

    @property
    def keeps_xi(self) -> bool:
        """Whether the exact zeros live in a sparse copy xi of the scales in the optimiser state (prox),
        rather than in the params; a run then also reports the sparse model's accuracy."""
        return self is Method.PROX

    @property
    def prunes_by_percent(self) -> bool:
        """Whether the method's scales are only small, never exactly zero, so that pruning needs a global
        percentage (NS) instead of removing the zero channels."""
        return self is Method.NS

    def optimizer_links(self, l1, beta, learning_rate, *, xi_init=None, xi_seed=0) -> tuple[list, list]:
        """(transforms before, transforms after) the SGD links of the optimiser chain:
        prox: [] / [palm_prox]; ista: [] / [soft_threshold]; ns: [l1_subgradient] / []; baseline: [] / []."""
        from palm_jax import prox

        if self is Method.PROX:
            return [], [prox.palm_prox(l1, beta, learning_rate, xi_init=xi_init, xi_seed=xi_seed)]
        if self is Method.ISTA:
            return [], [prox.soft_threshold(l1, learning_rate)]
        if self is Method.NS:
            return [prox.l1_subgradient(l1)], []
        return [], []


METHODS = tuple(m.value for m in Method)
