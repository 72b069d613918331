//! Shared pieces of the example and benchmark programs: timing samples, statistics, and a report printed as
//! a table and written as JSON.

use std::time::{Duration, Instant};

/// Latency samples of one variant.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    nanos: Vec<u64>,
}

impl Samples {
    /// Records one duration.
    pub fn push(&mut self, d: Duration) {
        self.nanos
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Times `f` once and records it; returns its output.
    pub async fn time<T, F: std::future::Future<Output = T>>(&mut self, f: F) -> T {
        let start = Instant::now();
        let out = f.await;
        self.push(start.elapsed());
        out
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Samples) {
        self.nanos.extend_from_slice(&other.nanos);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.nanos.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.nanos.is_empty()
    }

    /// Median, p99 and count, in microseconds.
    pub fn stats(&self) -> Stats {
        let mut v = self.nanos.clone();
        v.sort_unstable();
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            // Nearest rank.
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1] as f64 / 1_000.0
        };
        Stats {
            n: v.len(),
            median_us: at(0.5),
            p99_us: at(0.99),
        }
    }
}

/// Summary statistics of [`Samples`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Number of samples.
    pub n: usize,
    /// Median, in microseconds.
    pub median_us: f64,
    /// 99th percentile (nearest rank), in microseconds.
    pub p99_us: f64,
}

/// One row of a report: a measured variant, with its ratio to the row's baseline where there is one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// The group (e.g. `write: single-row UPDATE`).
    pub group: String,
    /// The variant (e.g. `CachedPool`).
    pub variant: String,
    /// Latency statistics, if this row is a latency.
    pub stats: Option<Stats>,
    /// A plain value (a count, a throughput), with its unit.
    pub value: Option<(f64, String)>,
    /// Median of this row divided by the baseline's median, if a baseline was given.
    pub ratio: Option<f64>,
}

/// A benchmark report: printed as a table, written as JSON.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Free-form facts about the run (machine, sizes).
    pub context: Vec<(String, String)>,
    /// The rows, in order.
    pub rows: Vec<Row>,
}

impl Report {
    /// Adds a latency row; `baseline` is the median (µs) that `ratio` divides by.
    pub fn latency(&mut self, group: &str, variant: &str, stats: Stats, baseline: Option<f64>) {
        self.rows.push(Row {
            group: group.to_owned(),
            variant: variant.to_owned(),
            stats: Some(stats),
            value: None,
            ratio: baseline.map(|b| stats.median_us / b),
        });
    }

    /// Adds a plain value row.
    pub fn value(&mut self, group: &str, variant: &str, value: f64, unit: &str) {
        self.rows.push(Row {
            group: group.to_owned(),
            variant: variant.to_owned(),
            stats: None,
            value: Some((value, unit.to_owned())),
            ratio: None,
        });
    }

    /// Adds a plain value row with its ratio to `baseline` (a value in the same unit).
    pub fn value_vs(&mut self, group: &str, variant: &str, value: f64, unit: &str, baseline: f64) {
        self.value(group, variant, value, unit);
        if let Some(row) = self.rows.last_mut() {
            row.ratio = Some(value / baseline);
        }
    }

    /// Adds a fact about the run.
    pub fn fact(&mut self, name: &str, value: impl std::fmt::Display) {
        self.context.push((name.to_owned(), value.to_string()));
    }

    /// The report as a Markdown table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| group | variant | median µs | p99 µs | n | value | ratio to baseline |\n|---|---|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            let (median, p99, n) =
                r.stats
                    .map_or((String::new(), String::new(), String::new()), |s| {
                        (
                            format!("{:.1}", s.median_us),
                            format!("{:.1}", s.p99_us),
                            s.n.to_string(),
                        )
                    });
            let value = r
                .value
                .as_ref()
                .map_or(String::new(), |(v, unit)| format!("{v:.1} {unit}"));
            let ratio = r.ratio.map_or(String::new(), |x| format!("{x:.2}×"));
            out.push_str(&format!(
                "| {} | {} | {median} | {p99} | {n} | {value} | {ratio} |\n",
                r.group, r.variant
            ));
        }
        out
    }

    /// Prints the table and writes the JSON to `path`.
    ///
    /// # Errors
    ///
    /// When the JSON cannot be written.
    pub fn finish(&self, path: &str) -> std::io::Result<()> {
        for (k, v) in &self.context {
            println!("- {k}: {v}");
        }
        println!();
        println!("{}", self.table());
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json)?;
        println!("wrote {path}");
        Ok(())
    }
}

/// `url` with its database replaced by `database` (query parameters kept).
pub fn database_url(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// A Zipf distribution over `1..=n` (rank `k` has weight `1 / k^s`), sampled by inverse CDF.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `1..=n` with exponent `s`.
    pub fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Self { cdf }
    }

    /// Maps a uniform `u` in `[0, 1)` to a rank in `1..=n`.
    pub fn sample(&self, u: f64) -> i64 {
        let i = self.cdf.partition_point(|&c| c < u);
        i64::try_from(i.min(self.cdf.len().saturating_sub(1)) + 1).unwrap_or(i64::MAX)
    }
}

/// Every key under `prefix` on the Redis at `redis_url` (a tool may `SCAN`; the library never does).
///
/// # Errors
///
/// The Redis error.
pub async fn prefix_keys(redis_url: &str, prefix: &str) -> redis::RedisResult<Vec<String>> {
    let client = redis::Client::open(redis_url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    let mut all = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await?;
        all.extend(keys);
        if next == 0 {
            return Ok(all);
        }
        cursor = next;
    }
}

/// Deletes every key under `prefix` on the Redis at `redis_url`.
///
/// # Errors
///
/// The Redis error.
pub async fn delete_prefix(redis_url: &str, prefix: &str) -> redis::RedisResult<()> {
    let keys = prefix_keys(redis_url, prefix).await?;
    let client = redis::Client::open(redis_url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    for chunk in keys.chunks(1000) {
        redis::cmd("UNLINK")
            .arg(chunk)
            .query_async::<()>(&mut con)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for us in 1..=100 {
            s.push(Duration::from_micros(us));
        }
        let st = s.stats();
        assert_eq!((st.n, st.median_us, st.p99_us), (100, 50.0, 99.0));
        let mut r = Report::default();
        r.latency("g", "base", st, None);
        r.latency(
            "g",
            "x",
            Stats {
                n: 1,
                median_us: 75.0,
                p99_us: 80.0,
            },
            Some(st.median_us),
        );
        let z = Zipf::new(100, 1.0);
        assert_eq!((z.sample(0.0), z.sample(0.999_999)), (1, 100));
        assert_eq!(
            database_url("postgres://u@h:1/db?x=1", "o"),
            "postgres://u@h:1/o?x=1"
        );
        assert!(
            r.table().contains("| g | x | 75.0 | 80.0 | 1 |  | 1.50× |"),
            "{}",
            r.table()
        );
    }
}
