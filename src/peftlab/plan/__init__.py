"""The memory planner: :mod:`~peftlab.plan.arch` (model shapes), :mod:`~peftlab.plan.memory` (the per-component
model of a run's peak, asking each method for its terms) and :mod:`~peftlab.plan.seed_table` (the seed's tables)."""
