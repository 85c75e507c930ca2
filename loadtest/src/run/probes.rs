//! What a run asks the processes it loads: the origin's counts and fault switch,
//! corral's metrics on its admin listener, and Redis's command counts.

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};

use super::HttpClient;

#[derive(Default)]
pub(super) struct OriginStats {
    pub(super) per_path: HashMap<String, u64>,
    pub(super) arrivals_ms: Vec<u64>,
    /// The most requests the origin had in progress at once, over its life.
    pub(super) max_in_flight: u64,
}

impl OriginStats {
    /// What the origin counted since `before` (its counts are of its whole life).
    pub(super) fn after(mut self, before: &OriginStats) -> OriginStats {
        for (path, n) in &before.per_path {
            if let Some(now) = self.per_path.get_mut(path) {
                *now = now.saturating_sub(*n);
            }
        }
        // Arrivals are recorded in order, under one lock: the earlier ones are `before`'s.
        let earlier = before.arrivals_ms.len().min(self.arrivals_ms.len());
        self.arrivals_ms.drain(..earlier);
        self
    }
}

pub(super) async fn origin_stats(
    client: &HttpClient,
    origin: SocketAddr,
) -> anyhow::Result<OriginStats> {
    let uri: http::Uri = format!("http://{origin}/__origin/stats").parse()?;
    let res = client
        .request(http::Request::get(uri).body(Empty::new())?)
        .await
        .context("reading the origin's counts")?;
    let body = res.into_body().collect().await?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body)?;
    let per_path = json["per_path"]
        .as_object()
        .context("origin stats: per_path")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    let arrivals_ms = json["arrivals_ms"]
        .as_array()
        .context("origin stats: arrivals")?
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    Ok(OriginStats {
        per_path,
        arrivals_ms,
        max_in_flight: json["max_in_flight"].as_u64().unwrap_or(0),
    })
}

pub(super) async fn origin_set(
    client: &HttpClient,
    origin: SocketAddr,
    query: &str,
) -> anyhow::Result<()> {
    let uri: http::Uri = format!("http://{origin}/__origin/set?{query}").parse()?;
    let res = client
        .request(http::Request::post(uri).body(Empty::new())?)
        .await?;
    anyhow::ensure!(res.status().is_success(), "origin refused {query}");
    Ok(())
}

pub(super) async fn admin_metrics(
    client: &HttpClient,
    admin: SocketAddr,
) -> anyhow::Result<String> {
    let uri: http::Uri = format!("http://{admin}/metrics").parse()?;
    let res = client
        .request(http::Request::get(uri).body(Empty::new())?)
        .await?;
    Ok(String::from_utf8_lossy(&res.into_body().collect().await?.to_bytes()).into_owned())
}

/// The sum of every sample line starting with `prefix`.
pub(super) fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `INFO commandstats` of the Redis on `port`: calls per command name (lowercase, as
/// Redis names them: `evalsha`, `getrange`, ...). Redis counts the commands a Lua
/// script runs under their own names as well as the script's call.
pub(super) async fn redis_commandstats(port: u16) -> anyhow::Result<HashMap<String, u64>> {
    let reply = corral_testkit::resp::command(port, &["INFO", "commandstats"])
        .await
        .with_context(|| format!("INFO commandstats on Redis port {port}"))?;
    let text = reply.text().context("INFO commandstats: not a string")?;
    Ok(parse_commandstats(&text))
}

/// `cmdstat_get:calls=3,usec=...` lines to `{"get": 3}`.
fn parse_commandstats(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_add_matching_lines() {
        let text = "a_total{x=\"1\"} 2\na_total{x=\"2\"} 3\nb_total 7\n# EOF\n";
        assert_eq!(metric_sum(text, "a_total{"), 5.0);
        assert_eq!(metric_sum(text, "b_total"), 7.0);
    }

    #[test]
    fn commandstats_give_calls_per_command() {
        let text = "# Commandstats\r\ncmdstat_get:calls=3,usec=5,usec_per_call=1.67,rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=12,usec=90\r\n";
        let stats = parse_commandstats(text);
        assert_eq!(stats.get("get"), Some(&3));
        assert_eq!(stats.get("evalsha"), Some(&12));
        assert_eq!(stats.len(), 2);
    }
}
