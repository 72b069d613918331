//! Runs the `metrics` example with a prefix of its own and checks that its exposition is valid Prometheus
//! text format (0.0.4), read as strictly as `promtool check metrics` reads it (its package is ~330 MB, so
//! it is not installed): names and labels well formed, one `# HELP` and `# TYPE` per family before its
//! samples, families contiguous, counters ending in `_total`, every series under the prefix; and that the
//! series the library promises are there (hits, invalidations, the commit → invalidate lag of both paths).
//! Needs PostgreSQL and Redis (`DATABASE_URL` / `REDIS_URL`, else the local defaults).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// One sample line: family-level name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_name(s) && !s.contains(':') && !s.starts_with("__")
}

/// Parses `{a="x",b="y"}` (the braces stripped); label values may escape `\\`, `\"` and `\n`.
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .ok_or(format!("label without =\": {s}"))?;
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in {s}")),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in {s}")),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice in {s}"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(labels)
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// The family a sample name belongs to, given the family's type (summaries: `_sum`, `_count`).
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> &'a str {
    for suffix in ["_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types
                .get(base)
                .is_some_and(|t| t == "summary" || t == "histogram")
        {
            return base;
        }
    }
    name
}

/// Checks the whole exposition; returns its samples.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let (mut types, mut helps) = (BTreeMap::new(), BTreeSet::new());
    let (mut done, mut current) = (BTreeSet::<String>::new(), String::new());
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let (keyword, rest) = comment
                .split_once(' ')
                .ok_or(format!("bad comment {line}"))?;
            let (name, tail) = rest
                .split_once(' ')
                .ok_or(format!("bad {keyword}: {line}"))?;
            if !is_name(name) {
                return Err(format!("bad metric name in {line}"));
            }
            match keyword {
                "HELP" if !helps.insert(name.to_owned()) => {
                    return Err(format!("second HELP: {line}"));
                }
                "HELP" if types.contains_key(name) => {
                    return Err(format!("HELP after TYPE: {line}"));
                }
                "HELP" => {}
                "TYPE" => {
                    if !["counter", "gauge", "summary", "histogram", "untyped"].contains(&tail) {
                        return Err(format!("bad type: {line}"));
                    }
                    if types.insert(name.to_owned(), tail.to_owned()).is_some() {
                        return Err(format!("second TYPE: {line}"));
                    }
                    if tail == "counter" && !name.ends_with("_total") {
                        return Err(format!("counter without _total: {line}"));
                    }
                }
                _ => return Err(format!("unknown comment keyword: {line}")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .ok_or(format!("unclosed labels: {line}"))?;
                (name, parse_labels(labels)?)
            }
            None => (series, BTreeMap::new()),
        };
        if !is_name(name) {
            return Err(format!("bad metric name in {line}"));
        }
        let family = family_of(name, &types).to_owned();
        if !types.contains_key(&family) {
            return Err(format!("sample before its TYPE: {line}"));
        }
        if family != current {
            if done.contains(&family) {
                return Err(format!("family {family} not contiguous: {line}"));
            }
            done.insert(std::mem::replace(&mut current, family));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value: parse_value(value)?,
        });
    }
    Ok(samples)
}

#[test]
fn the_metrics_example_serves_a_valid_exposition_under_its_prefix() {
    let out = Command::new(env!("CARGO_BIN_EXE_metrics"))
        .env("METRICS_SECONDS", "4")
        .env("METRICS_ADDR", "127.0.0.1:0")
        .env("METRICS_PREFIX", "demo_cache")
        .output()
        .expect("run the metrics example");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "metrics failed (needs PostgreSQL and Redis):\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples = parse(&text).unwrap_or_else(|e| panic!("{e}\nin:\n{text}"));
    for s in &samples {
        assert!(
            s.name.starts_with("demo_cache_"),
            "{} not under the prefix",
            s.name
        );
    }
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).is_some_and(|x| x == v)))
            .map(|s| s.value)
            .sum()
    };
    assert!(value("demo_cache_hits_total", None) > 0.0, "{text}");
    assert!(
        value(
            "demo_cache_invalidations_sent_total",
            Some(("path", "commit"))
        ) > 0.0,
        "{text}"
    );
    for path in ["commit", "relay"] {
        assert!(
            value(
                "demo_cache_invalidation_lag_seconds_count",
                Some(("path", path))
            ) > 0.0,
            "no {path} lag in:\n{text}"
        );
    }
    assert!(text.contains("# HELP demo_cache_hits_total "), "{text}");
    // The consistency SLI's series (the example samples 5% of its hits): present, and 0 inconsistent.
    assert!(
        value("demo_cache_consistency_samples_total", None) > 0.0,
        "{text}"
    );
    assert!(
        text.contains("demo_cache_consistency_inconsistent_total 0\n"),
        "{text}"
    );
}

#[test]
fn the_parser_refuses_what_promtool_refuses() {
    let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{p=\"c\\\"d\"} 1\n";
    assert!(parse(ok).is_ok(), "{:?}", parse(ok));
    for bad in [
        "a_total 1\n",                                                 // no TYPE
        "# TYPE a counter\na 1\n",                                     // counter without _total
        "# TYPE a_total counter\n# TYPE a_total counter\na_total 1\n", // second TYPE
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n",             // not contiguous
        "# TYPE a gauge\na{p=\"x} 1\n",                                // unterminated
        "# TYPE a gauge\na{1p=\"x\"} 1\n",                             // bad label name
        "# TYPE a gauge\na one\n",                                     // bad value
        "# TYPE 1a gauge\n",                                           // bad name
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
