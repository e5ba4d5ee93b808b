"""The monitor: polls Sensor Boxes through the agents, detects, diagnoses, repairs.

Rulesets in TOML (oomd's shape): detectors -> one diagnosis unit -> ordered actions.

- `Monitor`, `run_monitor` (core.py), what `backdoors monitor --config FILE` runs;
- `MonitorConfig`, `AgentEntry`, `load_config` (config.py);
- `Rule`, `load_ruleset`, `load_rulesets`, `default_rules` (rules.py);
- `Incident`, `load_incidents`, `show_incidents` (incidents.py).

docs/monitor.md is the reference of the rules, the config and the incident log.
"""

from .config import AgentEntry, MonitorConfig, load_config, parse_config
from .core import DEFAULT_INCIDENTS_DIR, Monitor, run_monitor
from .incidents import Incident, load_incidents, show_incidents
from .rules import Rule, Ruleset, default_rules, load_ruleset, load_rulesets, parse_ruleset

__all__ = [
    "DEFAULT_INCIDENTS_DIR", "AgentEntry", "Incident", "Monitor", "MonitorConfig", "Rule", "Ruleset", "default_rules",
    "load_config", "load_incidents", "load_ruleset", "load_rulesets", "parse_config",
    "parse_ruleset", "run_monitor", "show_incidents",
]
