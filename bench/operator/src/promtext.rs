//! Reading Prometheus text: counter sums and histogram quantiles over the
//! difference of two scrapes, as `histogram_quantile` would compute them.

use std::collections::{BTreeMap, BTreeSet};

/// One scrape: every sample line, `series -> value`.
#[derive(Clone, Debug, Default)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_string(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// The sum of every series of `metric` whose labels contain `filter`.
    pub fn sum(&self, metric: &str, filter: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let name = series.split('{').next().unwrap_or(series);
                name == metric && series.contains(filter)
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The sum of every series of `metric` that has each of `labels`
    /// (name, value), whatever its other labels and their order.
    pub fn sum_labelled(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (name, rest) = series.split_once('{').unwrap_or((series, ""));
                name == metric
                    && labels
                        .iter()
                        .all(|(k, v)| label_pairs(rest).any(|(lk, lv)| lk == *k && lv == *v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every value of `label` among `metric`'s series.
    pub fn label_values(&self, metric: &str, label: &str) -> BTreeSet<String> {
        let key = format!("{label}=\"");
        self.0
            .keys()
            .filter(|series| series.split('{').next() == Some(metric))
            .filter_map(|series| series.split(&key).nth(1)?.split('"').next())
            .map(str::to_string)
            .collect()
    }

    /// `(upper bound, cumulative count)` of a histogram's buckets.
    fn buckets(&self, histogram: &str, filter: &str) -> Vec<(f64, f64)> {
        let name = format!("{histogram}_bucket{{");
        let mut out: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter(|(s, _)| s.starts_with(&name) && s.contains(filter))
            .filter_map(|(s, v)| {
                let le = s.split("le=\"").nth(1)?.split('"').next()?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The `name="value"` pairs of a series' label set (after its `{`). A value
/// with a comma or an escaped quote inside would be misread; the series
/// this is used on (`apiserver_request_duration_seconds`) have none.
fn label_pairs(labels: &str) -> impl Iterator<Item = (&str, &str)> {
    labels.trim_end_matches('}').split(',').filter_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        Some((k.trim(), v.trim_matches('"')))
    })
}

/// The `q` quantile of what a histogram observed between two scrapes, by
/// linear interpolation inside the bucket (Prometheus' method). None when
/// nothing was observed.
pub fn quantile(
    before: &Scrape,
    after: &Scrape,
    histogram: &str,
    filter: &str,
    q: f64,
) -> Option<f64> {
    let old = before.buckets(histogram, filter);
    let buckets: Vec<(f64, f64)> = after
        .buckets(histogram, filter)
        .into_iter()
        .map(|(le, n)| {
            let was = old.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, n)| *n);
            (le, n - was)
        })
        .collect();
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * frac);
        }
        lower = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"
# HELP h x
h_bucket{c="a",le="0.1"} 10
h_bucket{c="a",le="1"} 10
h_bucket{c="a",le="+Inf"} 10
h_count{c="a"} 10
req_total{verb="get"} 5
req_total{verb="patch"} 1
"#;
    const AFTER: &str = r#"
h_bucket{c="a",le="0.1"} 60
h_bucket{c="a",le="1"} 110
h_bucket{c="a",le="+Inf"} 110
h_bucket{c="b",le="0.1"} 1000
h_count{c="a"} 110
req_total{verb="get"} 9
req_total{verb="patch"} 3
"#;

    #[test]
    fn quantiles_of_the_difference() {
        let (b, a) = (Scrape::parse(BEFORE), Scrape::parse(AFTER));
        // 100 new observations: 50 at or below 0.1, 50 in (0.1, 1].
        let p50 = quantile(&b, &a, "h", "c=\"a\"", 0.5).unwrap();
        assert!((p50 - 0.1).abs() < 1e-9, "{p50}");
        let p99 = quantile(&b, &a, "h", "c=\"a\"", 0.99).unwrap();
        assert!((p99 - (0.1 + 0.9 * 0.98)).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&a, &a, "h", "c=\"a\"", 0.5), None);
    }

    #[test]
    fn sums_by_filter() {
        let a = Scrape::parse(AFTER);
        assert_eq!(a.sum("req_total", ""), 12.0);
        assert_eq!(a.sum("req_total", "verb=\"patch\""), 3.0);
        assert_eq!(a.sum("h_count", ""), 110.0);
    }
}
