"""Rulesets and the monitor config: decoding, checks, and errors naming file, line and key."""

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backdoors.errors import ConfigError
from backdoors.monitor import actions, detectors, diagnosis
from backdoors.monitor import rules as monitor_rules
from backdoors.monitor.config import load_config, parse_config
from backdoors.common.configfile import locate, parse_error_path


def rules(text: str) -> monitor_rules.Ruleset:
    return monitor_rules.parse_ruleset(textwrap.dedent(text), "monitor_rules.toml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        rules(text)
    return str(e.value)


def test_default_ruleset_covers_the_three_repair_cases():
    by_name = {r.name: r for r in monitor_rules.default_rules()}
    assert list(by_name) == ["memory-hog", "fork-bomb", "kernel-integrity", "guest-unstable",
                             "hang", "agent-unreachable"]
    assert [type(a) for a in by_name["kernel-integrity"].actions] == [actions.HealKernel]
    assert [type(a) for a in by_name["guest-unstable"].actions] == [actions.KillGuestCulprit]
    assert isinstance(by_name["memory-hog"].diagnosis, diagnosis.MemoryHogDiagnosis)
    assert [type(a) for a in by_name["memory-hog"].actions] == [actions.KillCulprit]
    assert isinstance(by_name["fork-bomb"].diagnosis, diagnosis.ForkBombDiagnosis)
    assert [type(a) for a in by_name["fork-bomb"].actions] == [actions.LockKillLineage]
    assert {type(d) for d in by_name["hang"].detectors} == {detectors.ProgressStalled, detectors.NodeFrozen}
    assert [type(a) for a in by_name["hang"].actions] == [actions.Record]
    assert "default" in monitor_rules.packaged()


def test_both_toml_spellings_decode_the_same():
    inline = rules("""
        [[rule]]
        name = "r"
        detectors = [{ kind = "level_out_of_bounds", box = "kernel", sensors = ["pids"], max = 5 }]
        actions = [{ kind = "record", note = "x" }]
    """)
    tables = rules("""
        [[rule]]
        name = "r"
        [[rule.detectors]]
        kind = "level_out_of_bounds"
        box = "kernel"
        sensors = ["pids"]
        max = 5
        [[rule.actions]]
        kind = "record"
        note = "x"
    """)
    assert inline.rule == tables.rule
    assert inline.rule[0].detectors[0].max == 5.0


def test_syntax_error_names_file_line_and_column():
    msg = error("""
        [[rule]]
        name = "r"
        detectors = [{ kind = "node_frozen" ]
    """)
    assert msg.startswith("monitor_rules.toml: not valid TOML")
    assert "line 4" in msg


def test_unknown_kind_names_line_key_and_the_choices():
    msg = error("""
        [[rule]]
        name = "r"
        detectors = [
          { kind = "node_frozen" },
          { kind = "levle_out_of_bounds" },
        ]
    """)
    assert msg.startswith("monitor_rules.toml:6: key rule[0].detectors[1].kind: Invalid value")
    assert "level_out_of_bounds" in msg and "progress_stalled" in msg


def test_bad_value_in_second_array_table_names_its_line():
    msg = error("""
        [[rule]]
        name = "a"
        detectors = [{ kind = "node_frozen" }]

        [[rule]]
        name = "b"
        [[rule.detectors]]
        kind = "node_frozen"
        [[rule.detectors]]
        kind = "progress_stalled"
        deadline_ms = -5
    """)
    assert msg.startswith("monitor_rules.toml:12: key rule[1].detectors[1].deadline_ms:")
    assert "> 0" in msg


def test_unknown_field_is_located():
    msg = error("""
        [[rule]]
        name = "a"
        detectors = [{ kind = "node_frozen" }]
        # a comment with [brackets] and {braces}
        bogus = "x"
    """)
    assert msg.startswith("monitor_rules.toml:6: key rule[0].bogus: Object contains unknown field")


def test_missing_required_field_names_the_rule():
    msg = error("""
        [[rule]]
        detectors = [{ kind = "node_frozen" }]
    """)
    assert msg.startswith("monitor_rules.toml:2: key rule[0]:") and "`name`" in msg


def test_wrong_type_is_located():
    msg = error("""
        [[rule]]
        name = "a"
        detectors = [{ kind = "node_frozen", for_ms = "soon" }]
    """)
    assert msg.startswith("monitor_rules.toml:4: key rule[0].detectors[0].for_ms: Expected `float`")


@pytest.mark.parametrize("body, where, words", [
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "record" },\n'
     '  { kind = "kill_culprit" }]', "5: key rule[0].actions[1].kind", "needs a diagnosis"),
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "lock_kill_lineage" }]',
     "4: key rule[0].actions[0].kind", "fork_bomb"),
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "refresh" }]',
     "4: key rule[0].actions[0]", "exactly one of hook or command"),
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "recover", '
     'fence_hook = "db", fence_command = ["true"] }]', "4: key rule[0].actions[0]",
     "at most one of fence_hook and fence_command"),
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "recover", '
     'fence_command = [] }]', "4: key rule[0].actions[0].fence_command", "must not be empty"),
    ('name = "a b"\ndetectors = [{ kind = "node_frozen" }]', "2: key rule[0].name", "without spaces"),
    ('name = "a"\ndetectors = []', "3: key rule[0].detectors", "length >= 1"),
    ('name = "a"\ndetectors = [{ kind = "level_out_of_bounds", min = 5, max = 1 }]',
     "3: key rule[0].detectors[0].min", "min 5.0 > max 1.0"),
    ('name = "a"\nnodes = []\ndetectors = [{ kind = "node_frozen" }]', "3: key rule[0].nodes",
     "at least one"),
    # outside review: these loaded, then failed at the first incident, after a fence, or
    # turned detection or repairs off without a word
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "recover", '
     'timeout_s = -5.0 }]', "4: key rule[0].actions[0].timeout_s", "> 0.0"),
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "refresh", '
     'command = ["restart", "{nod}"] }]', "4: key rule[0].actions[0].command",
     "'{nod}': KeyError 'nod'"),
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = "recover", '
     'fence_command = ["f", "{0}"] }]', "4: key rule[0].actions[0].fence_command", "{target}"),
    ('name = "a"\nclear_ms = inf\ndetectors = [{ kind = "node_frozen" }]', "3: key rule[0].clear_ms",
     "must be a finite number, not inf"),
    ('name = "a"\ndetectors = [{ kind = "progress_stalled", deadline_ms = inf }]',
     "3: key rule[0].detectors[0].deadline_ms", "finite"),
    # a comm is 15 characters at most: a longer name to protect would protect nothing
    ('name = "a"\ndetectors = [{ kind = "node_frozen" }]\nactions = [{ kind = '
     '"kill_guest_culprit", protect = ["httpd-frontend-01"] }]',
     "4: key rule[0].actions[0].protect[0]", "length <= 15"),
    # outside review: a misspelt kernel sensor made a rule that never fires
    ('name = "a"\ndetectors = [{ kind = "level_out_of_bounds", box = "kernel", '
     'sensors = ["memory_mbb"] }]', "3: key rule[0].detectors[0].sensors[0]",
     "no level sensor of the kernel box is 'memory_mbb'; it has memory_mb, pids"),
    ('name = "a"\ndetectors = [{ kind = "pressure_over_rate", box = "kernel", '
     'sensors = ["memory_mb"] }]', "3: key rule[0].detectors[0].sensors[0]",
     "no pressure sensor of the kernel box is 'memory_mb'; it has forks"),
])
def test_semantic_errors_name_line_and_key(body, where, words):
    msg = error("[[rule]]\n" + body + "\n")
    assert msg.startswith(f"monitor_rules.toml:{where}:"), msg
    assert words in msg


def test_duplicate_rule_names_are_refused():
    msg = error("""
        [[rule]]
        name = "a"
        detectors = [{ kind = "node_frozen" }]
        [[rule]]
        name = "a"
        detectors = [{ kind = "node_frozen" }]
    """)
    assert msg.startswith("monitor_rules.toml:6: key rule[1].name") and "twice" in msg


def test_ruleset_file_errors_name_the_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[[rule]]\nname = "a"\ndetectors = [{ kind = "nope" }]\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3: key rule\[0\]\.detectors\[0\]\.kind"):
        monitor_rules.load_ruleset(str(path))
    with pytest.raises(ConfigError, match="cannot read ruleset"):
        monitor_rules.load_ruleset(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="no packaged ruleset 'nosuch'"):
        monitor_rules.load_ruleset("nosuch")


def test_rulesets_combine_and_refuse_a_name_twice(tmp_path):
    extra = tmp_path / "extra.toml"
    extra.write_text('[[rule]]\nname = "unreachable"\n'
                     'detectors = [{ kind = "agent_unreachable", after_ms = 500 }]\n')
    combined = monitor_rules.load_rulesets(["default", str(extra)])
    assert [r.name for r in combined][-1] == "unreachable"
    dup = tmp_path / "dup.toml"
    dup.write_text('[[rule]]\nname = "hang"\ndetectors = [{ kind = "node_frozen" }]\n')
    with pytest.raises(ConfigError, match="rule 'hang' is already defined in <packaged default.toml>"):
        monitor_rules.load_rulesets(["default", str(dup)])


def test_rule_node_patterns():
    r = rules("""
        [[rule]]
        name = "a"
        nodes = ["web-*", "db0"]
        detectors = [{ kind = "node_frozen" }]
    """).rule[0]
    assert r.applies_to("web-3") and r.applies_to("db0") and not r.applies_to("db1")


# ---- the locator ----------------------------------------------------------------------


def test_locate_handles_strings_comments_quoted_and_dotted_keys():
    text = textwrap.dedent('''\
        title = "a [fake] { table }"   # [[rule]]
        multi = """
        [[rule]]
        x = 1
        """
        "quoted key" = 1
        a.b.c = 2
        [t]
        'lit' = 'it''s'
        [[arr]]
        k = 1
        [[arr]]
        k = [1, [2, 3],
             { z = 4 }]
        ''')
    assert locate(text, ("title",)) == 1
    assert locate(text, ("quoted key",)) == 6
    assert locate(text, ("a", "b", "c")) == 7
    assert locate(text, ("t", "lit")) == 9
    assert locate(text, ("arr", 1, "k")) == 13
    assert locate(text, ("arr", 1, "k", 2, "z")) == 14
    assert locate(text, ("arr", 1, "k", 1, 0)) == 13
    assert locate(text, ("arr", 0, "k")) == 11
    assert locate(text, ("arr", 1, "nope")) == 12  # the deepest known part: the table
    assert locate(text, ("nope",)) is None


def test_parse_error_path():
    assert parse_error_path("Invalid value 'c' - at `$.rule[0].detectors[1].kind`") == (
        ("rule", 0, "detectors", 1, "kind"), "Invalid value 'c'")
    assert parse_error_path("Object contains unknown field `zz` - at `$.rule[2]`") == (
        ("rule", 2, "zz"), "Object contains unknown field `zz`")
    assert parse_error_path("Expected `int` - at `$.d[...]`")[0] == ("d",)
    assert parse_error_path("no path here") == ((), "no path here")


_key = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
_scalar = st.one_of(st.integers(-5, 5).map(str), st.sampled_from(['"s"', '"a]b"', '"{x}"', "true", "1.5"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_key, st.lists(st.lists(_scalar, max_size=3), max_size=3)),
                min_size=1, max_size=5, unique_by=lambda kv: kv[0]))
def test_locate_finds_every_array_element_on_its_line(entries):
    """Arrays of arrays, one element per line: each element is located on its own line."""
    lines, want = [], {}
    for key, outer in entries:
        lines.append(f"{key} = [")
        want[(key,)] = len(lines)
        for i, inner in enumerate(outer):
            lines.append("  [" + ", ".join(inner) + "],  # [not, a, value]")
            want[(key, i)] = len(lines)
        lines.append("]")
    text = "\n".join(lines) + "\n"
    import tomllib
    tomllib.loads(text)  # valid TOML
    for path, line in want.items():
        assert locate(text, path) == line


# ---- monitor config -------------------------------------------------------------------


CONFIG = """\
monitor_id = "m1"
key_file = "keys.toml"
period_ms = 20
rulesets = ["default", "extra.toml"]
incidents_dir = "incidents"

[[agents]]
host = "h0"
address = "10.99.0.1:7700"
nodes = ["n0"]

[[agents]]
host = "h1"
address = "10.99.0.2:7700"
"""


def test_config_resolves_relative_paths(tmp_path):
    path = tmp_path / "monitor.toml"
    path.write_text(CONFIG)
    c = load_config(str(path))
    assert c.key_file == str(tmp_path / "keys.toml")
    assert c.incidents_dir == str(tmp_path / "incidents")
    assert c.rulesets == ["default", str(tmp_path / "extra.toml")]
    assert c.agents[0].nodes == ["n0"] and c.agents[1].nodes is None
    assert c.period_ms == 20 and c.timeout_ms == 500


@pytest.mark.parametrize("change, where", [
    (('address = "10.99.0.2:7700"', 'address = "nowhere"'), "14: key agents[1].address"),
    (('host = "h1"', 'host = "h0"'), "13: key agents[1].host"),
    (("period_ms = 20", "period_ms = 0"), "3: key period_ms"),
    (('monitor_id = "m1"', 'monitor_id = "m 1"'), "1: key monitor_id"),
    (('nodes = ["n0"]', 'nodes = ["n0", "n0"]'), "10: key agents[0].nodes"),
    (("period_ms = 20", "period_ms = 20\npoll = 1"), "4: key poll"),
    (("period_ms = 20", "period_ms = 20\nsettle_ms = inf"), "4: key settle_ms"),
    (("period_ms = 20", "period_ms = 20\nvote_window_s = inf"), "4: key vote_window_s"),
])
def test_config_errors_name_file_line_and_key(change, where):
    with pytest.raises(ConfigError) as e:
        parse_config(CONFIG.replace(*change), "mon.toml")
    assert str(e.value).startswith(f"mon.toml:{where}:"), str(e.value)


def test_every_unit_declares_what_the_engine_needs():
    """Units are registered once; what an action needs some diagnosis provides."""
    for unit in (*detectors.DETECTORS, *diagnosis.DIAGNOSES, *actions.ACTIONS):
        assert unit.kind_name()
    for action in actions.ACTIONS:
        assert action.effect in ("repair", "recover", "record")
        for need in action.needs:
            assert need in diagnosis.CAPABILITIES
            assert any(need in d.provides for d in diagnosis.DIAGNOSES)
    assert monitor_rules.KINDS["actions"] == [a.kind_name() for a in actions.ACTIONS]


def test_no_recovery_node_names_what_is_missing():
    """Each reason a recover action has nowhere to go, said with what to do about it."""
    from backdoors.monitor.context import Context
    from backdoors.monitor.detectors import NodeView

    def why(fleet, target=None):
        ctx = Context("hang", "i1", NodeView("n0", "h0", 0.0), [], 0.0, 0.0, None, fleet=fleet)
        return actions.no_recovery_node(ctx, target)
    alone = why({"h0": (None, {"n0": False})})
    assert "only agent h0" in alone and "[[monitor.agents]]" in alone and "target" in alone
    down = why({"h0": (None, {"n0": False}), "h1": ("connection refused", {"n1": False})})
    assert "agent h1 does not answer (connection refused)" in down
    fenced = why({"h0": (None, {"n0": False}), "h1": (None, {"n1": True, "n2": True})})
    assert "agent h1's nodes are fenced (n1, n2" in fenced and "unfence" in fenced
    assert "agent h2 serves no node" in why({"h0": (None, {}), "h2": (None, {})})
    unknown = why({"h0": (None, {"n0": False})}, target="web9")
    assert "target 'web9' is not a node of any agent" in unknown and "h0" in unknown
    assert "web9 is fenced" in why({"h1": (None, {"web9": True})}, target="web9")
    assert "does not answer" in why({"h1": ("timeout", {"web9": False})}, target="web9")
