"""Checks that span sections: rules and GC policies name configured sites, names are unique.

They run on the raw (merged file + environment) data, so they report alongside
field problems in the same run even when some fields are invalid, each at the
YAML path of the value at fault.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from replicator.config.report import Loc, Problem, format_path


def unknown_name(kind: str, name: str, known: list[str]) -> str:
    """'unknown site 'us-est' (did you mean 'us-east'?); known: ...'."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; known: {', '.join(sorted(known)) or 'none'}"


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def _item(parent: Loc, key: str, value: Any, index: int) -> Loc:
    """Where item `index` of `key` is: `to[1]`, or just `to` when a single string was given."""
    return (*parent, key, index) if isinstance(value, list) else (*parent, key)


def _duplicates(items: list, list_loc: Loc, kind: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        name = item.get("name") if isinstance(item, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            also = format_path((*list_loc, seen[name]))
            problems.append(
                Problem((*list_loc, i, "name"), f"duplicate {kind} name {name!r} (also {also})")
            )
        seen.setdefault(name, i)
    return problems


def _rule_problems(i: int, rule: Mapping, sites: Mapping) -> list[Problem]:
    where: Loc = ("rules", i)
    known = [str(k) for k in sites]
    problems: list[Problem] = []
    source = rule.get("from", rule.get("from_"))
    if isinstance(source, str) and source not in sites:
        problems.append(Problem((*where, "from"), unknown_name("site", source, known)))
    targets: set[str] = set()
    for j, target in enumerate(_as_list(rule.get("to"))):
        if not isinstance(target, str):
            continue
        loc = _item(where, "to", rule.get("to"), j)
        if target == source:
            message = f"rule {rule.get('name')!r} would replicate site {target!r} onto itself"
            problems.append(Problem(loc, message))
        elif target not in sites:
            problems.append(Problem(loc, unknown_name("site", target, known)))
        elif target in targets:
            problems.append(Problem(loc, f"site {target!r} listed twice"))
        targets.add(target)
    return problems


def _policy_problems(i: int, policy: Mapping, sites: Mapping, rules: list) -> list[Problem]:
    where: Loc = ("gc", "policies", i)
    known = [str(k) for k in sites]
    problems: list[Problem] = []
    if policy.get("follow_source") is True:
        targets = {t for r in rules if isinstance(r, Mapping) for t in _as_list(r.get("to"))}
        for site in _as_list(policy.get("sites")):
            if isinstance(site, str) and site in sites and site not in targets:
                message = f"site {site!r} is no rule's target, so it has no source to follow"
                problems.append(Problem((*where, "follow_source"), message))
    mode = policy.get("mode", "api")
    for j, site in enumerate(_as_list(policy.get("sites"))):
        if not isinstance(site, str):
            continue
        if site not in sites:
            loc = _item(where, "sites", policy.get("sites"), j)
            problems.append(Problem(loc, unknown_name("site", site, known)))
        elif mode in ("storage", "both"):
            site_data = sites[site]
            if not (isinstance(site_data, Mapping) and site_data.get("storage")):
                message = f"mode {mode!r} needs sites.{site}.storage (the registry's rootdirectory)"
                problems.append(Problem((*where, "mode"), message))
    return problems


def cross_problems(data: Mapping) -> list[Problem]:
    """Every cross-section problem in `data` (the document as parsed; may be invalid)."""
    sites = data.get("sites")
    sites = sites if isinstance(sites, Mapping) else {}
    rules = data.get("rules")
    rules = rules if isinstance(rules, list) else []
    gc = data.get("gc")
    policies = gc.get("policies") if isinstance(gc, Mapping) else None
    policies = policies if isinstance(policies, list) else []
    problems = _duplicates(rules, ("rules",), "rule")
    for i, rule in enumerate(rules):
        if isinstance(rule, Mapping):
            problems += _rule_problems(i, rule, sites)
    problems += _duplicates(policies, ("gc", "policies"), "policy")
    for i, policy in enumerate(policies):
        if isinstance(policy, Mapping):
            problems += _policy_problems(i, policy, sites, rules)
    return problems
