//! What a run asks the processes it loads: the origin's counts and fault switch, and
//! corral's metrics on its admin listener.

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Empty};

use super::HttpClient;

pub(super) struct OriginStats {
    pub(super) per_path: HashMap<String, u64>,
    pub(super) arrivals_ms: Vec<u64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_add_matching_lines() {
        let text = "a_total{x=\"1\"} 2\na_total{x=\"2\"} 3\nb_total 7\n# EOF\n";
        assert_eq!(metric_sum(text, "a_total{"), 5.0);
        assert_eq!(metric_sum(text, "b_total"), 7.0);
    }
}
