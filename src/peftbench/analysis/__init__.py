"""Analyses of run records (plain dicts, the content of ``result.json``): pure functions.

* :mod:`records` - grouping into cells, learning-rate selection, seed statistics
* :mod:`convergence` - samples / steps / seconds to converge, AUC, PEFT vs full, the claim
* :mod:`data_requirement` - the smallest train size where PEFT catches up with full
* :mod:`decision` - the rule table task type x data scale -> method
* :mod:`recommend` - the rule table applied to a new task
* :mod:`overview` - all of the above at once
"""

from peftbench.analysis.decision import DecisionConfig
from peftbench.analysis.overview import Analysis, analyse_records
from peftbench.analysis.scales import Scales

__all__ = ["Analysis", "DecisionConfig", "Scales", "analyse_records"]
