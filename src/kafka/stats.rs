//! The consumer-lag gauge from librdkafka's statistics.

use rdkafka::client::ClientContext;

/// How often librdkafka reports statistics to consumers (for the lag gauge).
pub const STATISTICS_INTERVAL_MS: &str = "2000";

/// Sets `wagate_consumer_lag{topic}` from a consumer's librdkafka statistics:
/// per topic, the sum over the partitions this client is fetching of the high
/// watermark minus the committed offset (or, when nothing is committed, the
/// position of the application). Topics whose partitions are no longer
/// fetched here (after a rebalance) drop to 0.
pub fn record_consumer_lag(stats: &rdkafka::statistics::Statistics) {
    for (name, lag) in consumer_lag_by_topic(stats) {
        metrics::gauge!(crate::metrics::CONSUMER_LAG, "topic" => name.to_string()).set(lag as f64);
    }
}

/// Per topic in a consumer's statistics, the lag over the partitions this
/// client is fetching (see [`record_consumer_lag`]).
pub fn consumer_lag_by_topic(
    stats: &rdkafka::statistics::Statistics,
) -> impl Iterator<Item = (&str, i64)> {
    stats.topics.iter().map(|(name, topic)| {
        let lag: i64 = topic
            .partitions
            .values()
            .filter(|p| p.partition >= 0 && p.fetch_state == "active" && p.hi_offset >= 0)
            .map(|p| {
                if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.app_offset >= 0 {
                    (p.hi_offset - p.app_offset).max(0)
                } else {
                    0
                }
            })
            .sum();
        (name.as_str(), lag)
    })
}

/// Context for consumers that only need the lag gauge.
pub struct LagContext;

impl ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        record_consumer_lag(&statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}
