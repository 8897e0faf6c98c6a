"""Hypothesis settings profiles for the property and fuzz tests, chosen by ``HYPOTHESIS_PROFILE``.

* ``ci`` (default): derandomized (the same examples on every run, so CI is reproducible), no
  example database, no deadline (CI machines are slow and shared). Each test sets its own
  ``max_examples``: a few hundred in all, about a minute on 2 cores.
* ``long``: random, with the example database, for manual bug hunts; the tests raise their
  example counts (5,000 for the random-graph API property)::

      HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/test_property_graphs.py

Importing this module registers and loads the profile; test modules import it first.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("long", **_COMMON)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
LONG = PROFILE == "long"
