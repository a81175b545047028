"""A cost sheet before the run: `python -m mcf_fast.plan` (see docs/plan.md)."""
