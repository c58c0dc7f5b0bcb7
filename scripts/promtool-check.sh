#!/usr/bin/env bash
# Checks the operations files under grafana/:
#   - promtool check rules / promtool test rules on grafana/alerts/;
#   - every dashboard JSON loads, each panel has a datasource and targets with
#     a non-empty expr, and every expr parses (promtool check rules on the
#     exprs as recording rules, Grafana variables replaced);
#   - every metric name in any PromQL expression (dashboards, their variables,
#     alert rules, the rule tests' input series) is one src/metrics.rs exports
#     (histograms only through _bucket/_sum/_count).
# Installs Debian's prometheus package (for promtool) if promtool is missing.
# Exits non-zero if anything failed, after running every check.
set -uo pipefail
cd "$(dirname "$0")/.."

rules=grafana/alerts/wagate-rules.yaml
tests=grafana/alerts/wagate-rules.test.yaml
failed=()
exprs_rules=$(mktemp --suffix=.yaml)
trap 'rm -f "$exprs_rules"' EXIT

scripts/ensure-prometheus.sh || failed+=("install prometheus (promtool)")

if command -v promtool >/dev/null 2>&1; then
    echo "== promtool check rules $rules"
    promtool check rules --lint-fatal "$rules" || failed+=("promtool check rules")
    echo "== promtool test rules $tests"
    promtool test rules "$tests" || failed+=("promtool test rules")
else
    failed+=("promtool not available")
fi

echo "== dashboards and metric names"
python3 - "$rules" "$tests" "$exprs_rules" grafana/dashboards/*.json <<'PY' || failed+=("dashboards / metric names")
import json, re, sys

rules_path, tests_path, exprs_out, dashboards = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
errors = []
dashboard_exprs = []  # (where, expr with Grafana variables replaced)

def substitute(expr):
    e = re.sub(r'\$\{?__(rate_interval|interval|range)\}?', '5m', expr)
    return re.sub(r'\$\{[^}]*\}|\$\w+', '.*', e)

# Names exported by src/metrics.rs: `pub const X: &str = "wagate_...";`, and
# which of them are histograms (`describe_histogram!(X, ...)`).
src = open("src/metrics.rs").read()
consts = dict(re.findall(r'pub const (\w+): &str = "(\w+)";', src))
histograms = {consts[c] for c in re.findall(r'describe_histogram!\(\s*(\w+)', src) if c in consts}
plain = set(consts.values()) - histograms
if not consts:
    errors.append("src/metrics.rs: no metric names found")

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "and", "or", "unless", "offset", "inf", "nan"}

def metric_names(expr):
    """Metric names selected by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)', r' \1 ', expr)
    e = re.sub(r'\$\{[^}]*\}|\$\w+', ' ', e)                      # Grafana variables
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', ' ', e)  # strings
    e = re.sub(r'\{[^}]*\}', ' ', e)                               # label matchers
    e = re.sub(r'\[[^\]]*\]', ' ', e)                              # ranges, subqueries
    e = re.sub(r'\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', ' ', e)
    e = re.sub(r'(?<![\w:.])\d[\w.+-]*', ' ', e)                   # numbers, durations
    out = []
    for m in re.finditer(r'[A-Za-z_:][\w:]*', e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in KEYWORDS:
            continue                                               # function / keyword
        out.append(m.group(0))
    return out

def check_names(where, expr):
    names = metric_names(expr)
    if not names:
        errors.append(f"{where}: no metric in expression: {expr}")
    for n in names:
        base = re.sub(r'_(bucket|sum|count)$', '', n)
        if n in plain or (base != n and base in histograms):
            continue
        if n in histograms:
            errors.append(f"{where}: histogram {n} used without _bucket/_sum/_count")
        else:
            errors.append(f"{where}: metric {n} is not exported by src/metrics.rs")

# Dashboards.
uids = {}
for path in dashboards:
    try:
        d = json.load(open(path))
    except Exception as e:
        errors.append(f"{path}: not valid JSON: {e}")
        continue
    if not d.get("uid"):
        errors.append(f"{path}: no uid")
    elif d["uid"] in uids:
        errors.append(f"{path}: uid {d['uid']} also used by {uids[d['uid']]}")
    uids[d.get("uid")] = path
    if d.get("schemaVersion", 0) < 38:
        errors.append(f"{path}: schemaVersion {d.get('schemaVersion')} < 38")
    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        errors.append(f"{path}: no datasource variable `datasource` of type prometheus")
    for name, v in variables.items():
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            check_names(f"{path}: variable {name}", q)
    panels, ids = [], set()
    stack = list(d.get("panels", []))
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))  # collapsed rows
        if p.get("type") != "row":
            panels.append(p)
    if not panels:
        errors.append(f"{path}: no panels")
    for p in panels:
        where = f"{path}: panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            errors.append(f"{where}: duplicate panel id")
        ids.add(p.get("id"))
        if "gridPos" not in p:
            errors.append(f"{where}: no gridPos")
        if not (p.get("datasource") or {}).get("uid"):
            errors.append(f"{where}: no datasource")
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"{where}: no targets")
        for t in targets:
            expr = (t.get("expr") or "").strip()
            if not expr:
                errors.append(f"{where}: target {t.get('refId')} has an empty expr")
                continue
            if not (t.get("datasource") or p.get("datasource") or {}).get("uid"):
                errors.append(f"{where}: target {t.get('refId')} has no datasource")
            check_names(f"{where} target {t.get('refId')}", expr)
            dashboard_exprs.append((f"{where} target {t.get('refId')}", substitute(expr)))
    print(f"{path}: {len(panels)} panels")

# Alert rules and their tests' input series.
try:
    import yaml
    rules = yaml.safe_load(open(rules_path))
    exprs = [(f"{rules_path}: {r.get('alert') or r.get('record')}", str(r["expr"]))
             for g in rules["groups"] for r in g["rules"]]
    tests = yaml.safe_load(open(tests_path))
    series = [(f"{tests_path}: {t.get('name')}", s["series"])
              for t in tests["tests"] for s in t.get("input_series", [])]
except ImportError:  # no PyYAML: one-line `expr:` / `series:` values
    def grab(path, key):
        out = []
        for i, line in enumerate(open(path), 1):
            m = re.match(rf'\s*-?\s*{key}:\s*(.+?)\s*$', line)
            if m and m.group(1) not in ("|", ">", "|-", ">-"):
                v = m.group(1)
                if v[:1] in "'\"" and v[-1:] == v[:1]:
                    v = v[1:-1]
                out.append((f"{path}:{i}", v))
        return out
    exprs, series = grab(rules_path, "expr"), grab(tests_path, "series")
if not exprs:
    errors.append(f"{rules_path}: no rules found")
for where, expr in exprs:
    check_names(where, expr)
for where, s in series:
    check_names(where, s)
print(f"{rules_path}: {len(exprs)} rules; {tests_path}: {len(series)} input series")

# Dashboard exprs as recording rules, for promtool to parse.
with open(exprs_out, "w") as f:
    f.write("groups:\n  - name: dashboards\n    rules:\n")
    for i, (where, expr) in enumerate(dashboard_exprs):
        f.write(f"      # {where}\n      - record: dashboard:expr_{i}\n        expr: {json.dumps(expr)}\n")

for e in errors:
    print("FAIL:", e)
sys.exit(1 if errors else 0)
PY

if command -v promtool >/dev/null 2>&1; then
    echo "== promtool check rules (dashboard exprs)"
    promtool check rules --lint-fatal "$exprs_rules" || failed+=("dashboard exprs do not parse")
fi

if [ ${#failed[@]} -ne 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "OK: rules, rule tests and dashboards pass"
