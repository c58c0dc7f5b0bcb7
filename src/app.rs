//! The composition root: builds every plane from a [`Config`], binds the two
//! listeners, runs the background tasks, and shuts everything down in order.
//!
//! Shutdown order: readiness false → stop accepting → open connections finish
//! (in-flight webhooks are acknowledged or answered 503) → the producer is
//! flushed under the deadline → report whether the drain completed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, Readiness};
use crate::config::Config;
use crate::contacts::{Contacts, MemoryContacts};
use crate::egress::drain::Egress;
use crate::http::{self, Limits};
use crate::ingress::dedupe::Dedupe;
use crate::ingress::shared::IdShare;
use crate::ingress::{Ingress, IngressProducers};
use crate::kafka::{KafkaProducer, TopicId, Topics};
use crate::metrics as m;

/// A running gateway.
pub struct Gateway {
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    pub ready: Arc<Readiness>,
    pub metrics: PrometheusHandle,
    /// The contacts cache egress consults.
    pub contacts: Arc<MemoryContacts>,
    /// The template registry egress checks template sends against.
    pub templates: Arc<crate::templates::Registry>,
    /// The one shutdown signal: listeners, egress and background tasks.
    shutdown: CancellationToken,
    /// Cancelled after egress has drained: the contacts readers stop last.
    contacts_stop: CancellationToken,
    contacts_thread: Option<std::thread::JoinHandle<()>>,
    /// The fleet's dedupe: the id sharer (ends with `contacts_stop`, after
    /// the listeners drained) and the `inbound.ids` reader.
    sharer: Option<JoinHandle<()>>,
    dedupe_thread: Option<std::thread::JoinHandle<()>>,
    /// What wagate learns about each business number (`wa.numbers`).
    pub numbers: Arc<crate::numbers::Numbers>,
    numbers_threads: Vec<std::thread::JoinHandle<()>>,
    egress: Option<JoinHandle<()>>,
    /// The media worker's consumer thread (`[media] enabled`).
    media_thread: Option<std::thread::JoinHandle<()>>,
    /// The media plane, if enabled (tests reach its store through it).
    pub media: Option<Arc<crate::media::Media>>,
    servers: Vec<JoinHandle<bool>>,
    background: Vec<JoinHandle<()>>,
    /// Every producer made: the shared one and ingress's own.
    producers: Vec<KafkaProducer>,
    shutdown_timeout: Duration,
    shutdown_grace: Duration,
}

/// Every body under server.max_body_bytes must be storable: refuses to start
/// (before any port is bound) when a topic ingress writes takes smaller
/// records. A broker that cannot say is warned about.
async fn check_record_limit(cfg: &Config) -> anyhow::Result<()> {
    let checked = if cfg.kafka.check_record_limit {
        crate::kafka::check_record_limit(&cfg.kafka, Duration::from_secs(3)).await
    } else {
        Ok(Some(Vec::new()))
    };
    match checked {
        Ok(Some(small)) if !small.is_empty() => {
            let why: Vec<String> = small.iter().map(|s| s.to_string()).collect();
            anyhow::bail!("kafka: {}", why.join("; "));
        }
        Ok(Some(_)) => {}
        Ok(None) | Err(_) => tracing::warn!(
            needed = cfg.kafka.message_max_bytes,
            "kafka: could not read the max.message.bytes of the inbound topics; a body the broker refuses as too large is answered 503"
        ),
    }
    Ok(())
}

/// Refuses to start when a compacted topic is not compacted (its records
/// would be deleted at retention time); every other difference is warned
/// about, and a broker that cannot say is too.
async fn check_topics(cfg: &Config) -> anyhow::Result<()> {
    if !cfg.kafka.check_record_limit {
        return Ok(());
    }
    let problems = match crate::kafka::check_topics(&cfg.kafka, Duration::from_secs(3)).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "kafka: could not check the topics (`wagate topics check` says more)");
            return Ok(());
        }
    };
    // A compacted topic with a delete policy loses state at retention time;
    // without `inbound.ids` the fleet's dedupe cannot start.
    let ids = Topics::new(&cfg.kafka.topic_prefix)
        .name(TopicId::InboundIds)
        .to_string();
    let (refuse, warn): (Vec<_>, Vec<_>) = problems.iter().partition(|p| {
        p.issue == crate::kafka::TopicIssue::CompactedNotCompacted
            || (cfg.ingress.dedupe_shared
                && p.issue == crate::kafka::TopicIssue::Missing
                && p.topic == ids)
    });
    for p in warn {
        tracing::warn!(topic = %p.topic, problem = %p.message, "kafka: topic differs from the expected one");
    }
    if !refuse.is_empty() {
        let why: Vec<String> = refuse.iter().map(|p| p.to_string()).collect();
        anyhow::bail!("kafka: {}", why.join("; "));
    }
    Ok(())
}

/// The shared producer, ingress's two (made only where a window differs
/// from one already made), and every producer made, for flush and gauges.
/// Ingress batches longer than egress when busy (librdkafka sends one
/// partition per produce request, so a longer linger means far fewer
/// requests and a shorter tail under load; egress waits on each attempt
/// record, so it keeps the short one); while few POSTs are in flight it uses
/// a short window, so a webhook does not wait out a batch nobody fills.
fn producers(
    cfg: &Config,
) -> anyhow::Result<(KafkaProducer, IngressProducers, Vec<KafkaProducer>)> {
    let shared = KafkaProducer::new(&cfg.kafka)
        .map_err(|e| anyhow::anyhow!("kafka.brokers: cannot create the producer: {e}"))?;
    let mut made = vec![(cfg.kafka.linger_ms, shared.clone())];
    let mut with_linger = |linger_ms: u64, suffix: &str| -> anyhow::Result<KafkaProducer> {
        if let Some((_, p)) = made.iter().find(|(l, _)| *l == linger_ms) {
            return Ok(p.clone());
        }
        let mut k = cfg.kafka.clone();
        k.linger_ms = linger_ms;
        k.client_id = format!("{}-{suffix}", cfg.kafka.client_id);
        let p = KafkaProducer::new(&k).map_err(|e| {
            anyhow::anyhow!("kafka.brokers: cannot create the {suffix} producer: {e}")
        })?;
        made.push((linger_ms, p.clone()));
        Ok(p)
    };
    let busy = with_linger(cfg.ingress.linger_ms, "ingress")?;
    let quiet = match cfg.ingress.busy_in_flight {
        0 => None,
        _ => Some(with_linger(cfg.ingress.quiet_linger_ms, "ingress-quiet")?),
    };
    let ingress = IngressProducers {
        busy,
        quiet,
        busy_in_flight: cfg.ingress.busy_in_flight,
    };
    Ok((shared, ingress, made.into_iter().map(|(_, p)| p).collect()))
}

/// Contacts: bootstrap from the compacted topics, then tail them, on a
/// thread of its own; readiness is set once caught up.
fn spawn_contacts_sync(
    cfg: &Config,
    topics: &Topics,
    cache: Arc<MemoryContacts>,
    ready: Arc<Readiness>,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (consent, windows, users) = (
        topics.name(TopicId::Consent).to_string(),
        topics.name(TopicId::Windows).to_string(),
        topics.name(TopicId::Users).to_string(),
    );
    let conn = cfg.kafka.connection.clone();
    std::thread::Builder::new()
        .name("contacts-sync".into())
        .spawn(move || {
            let on_ready = Box::new(move || ready.contacts.store(true, Ordering::SeqCst));
            if let Err(e) =
                crate::contacts::sync::run(&conn, &consent, &windows, &users, cache, on_ready, stop)
            {
                tracing::error!(error = %e, "contacts sync stopped; /readyz stays 503");
            }
        })
}

/// The fleet's dedupe: reads `inbound.ids` back into `dedupe` (readiness
/// once caught up), then follows it, on a thread of its own.
fn spawn_dedupe_tail(
    cfg: &Config,
    topics: &Topics,
    dedupe: Arc<Dedupe>,
    own_key: [u8; 16],
    ready: Arc<Readiness>,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let opts = crate::ingress::shared::TailOptions {
        topic: topics.name(TopicId::InboundIds).to_string(),
        own_key,
        propagation: cfg.ingress.dedupe_propagation,
    };
    let conn = cfg.kafka.connection.clone();
    std::thread::Builder::new()
        .name("dedupe-tail".into())
        .spawn(move || {
            let on_ready = Box::new(move || ready.dedupe.store(true, Ordering::SeqCst));
            if let Err(e) = crate::ingress::shared::tail(&conn, &opts, &dedupe, on_ready, &stop) {
                tracing::error!(error = %e, "reading inbound.ids stopped; /readyz stays 503");
            }
        })
}

/// A listener's TLS from its validated files (None: plain HTTP), its
/// counters published at 0.
fn listener_tls(
    name: &'static str,
    files: Option<&crate::tls::TlsFiles>,
) -> anyhow::Result<Option<crate::tls::ListenerTls>> {
    let Some(files) = files else {
        return Ok(None);
    };
    let tls = crate::tls::ListenerTls::new(files)?;
    m::zero_tls(name);
    Ok(Some(tls))
}

impl Gateway {
    /// Builds and starts every plane. Ports are bound before this returns
    /// (use port 0 to get free ones; see `public_addr`).
    pub async fn start(cfg: Config) -> anyhow::Result<Gateway> {
        let metrics = m::install();
        check_record_limit(&cfg).await?;
        check_topics(&cfg).await?;
        let (producer, ingress_producers, all_producers) = producers(&cfg)?;
        let dedupe = Arc::new(Dedupe::new(
            cfg.ingress.dedupe_window,
            cfg.ingress.dedupe_max_entries,
        ));
        let contacts = Arc::new(MemoryContacts::new());
        // Every topic name, resolved once from the prefix.
        let topics = Topics::new(&cfg.kafka.topic_prefix);
        let templates = Arc::new(crate::templates::Registry::from_config(&cfg));
        let share = cfg.ingress.dedupe_shared.then(|| {
            // Id records want the short batching window: a POST waits for
            // its ids before its 200.
            let p = ingress_producers
                .quiet
                .clone()
                .unwrap_or_else(|| ingress_producers.busy.clone());
            IdShare::new(
                p,
                topics.name(TopicId::InboundIds).to_string(),
                crate::ingress::shared::instance_key(),
            )
        });
        let mut ingress = Ingress::new(
            &cfg,
            topics.clone(),
            ingress_producers,
            dedupe.clone(),
            Some(contacts.clone() as Arc<dyn Contacts>),
        );
        if let Some(s) = &share {
            ingress = ingress.with_share(s.clone());
        }
        let ingress = ingress.with_templates(templates.clone());
        let ingress = Arc::new(ingress);
        let ready = Arc::new(Readiness::default());
        if share.is_none() {
            ready.dedupe.store(true, Ordering::SeqCst);
        }
        let media = match cfg.media.enabled {
            true => Some(Arc::new(crate::media::Media::new(
                &cfg,
                topics.clone(),
                producer.clone(),
            )?)),
            false => None,
        };
        let admin = Arc::new(Admin {
            metrics: metrics.clone(),
            ready: ready.clone(),
            api: crate::admin::api::Api {
                tenants: cfg.tenants.clone(),
                contacts: contacts.clone(),
                writer: crate::contacts::writer::ContactsWriter::new(producer.clone(), &topics),
                producer: producer.clone(),
                requests_topic: topics.name(TopicId::OutboundRequests).to_string(),
                ack_timeout: cfg.ingress.ack_timeout,
                body_limits: http::BodyLimits::of(&cfg, crate::admin::api::MAX_API_BODY),
                media: media.clone(),
            },
        });

        // TLS first: a certificate that no longer loads (it changed since
        // the config was checked) stops the start before any port is bound.
        let public_tls = listener_tls("public", cfg.tls.as_ref())?;
        let internal_tls = listener_tls("internal", cfg.internal_tls.as_ref())?;
        let public = http::bind("listen", cfg.listen).await?;
        let internal = http::bind("internal_listen", cfg.internal_listen).await?;
        let public_addr = public.local_addr()?;
        let internal_addr = internal.local_addr()?;
        let shutdown = CancellationToken::new();
        let rx = shutdown.clone();
        let limits = Limits {
            max_connections: cfg.max_connections,
            max_connections_per_peer: cfg.max_connections_per_peer,
            h2_max_concurrent_streams: cfg.h2_max_concurrent_streams,
            header_read_timeout: cfg.header_read_timeout,
            shutdown_timeout: cfg.shutdown_timeout,
        };
        let servers = vec![
            tokio::spawn(http::serve(
                "public",
                public,
                limits,
                move |req| ingress.clone().handle(req),
                public_tls.as_ref().map(|t| t.acceptor.clone()),
                rx.clone(),
            )),
            tokio::spawn(http::serve(
                "internal",
                internal,
                limits,
                move |req| admin.clone().handle(req),
                internal_tls.as_ref().map(|t| t.acceptor.clone()),
                rx.clone(),
            )),
        ];
        let numbers = Arc::new(crate::numbers::Numbers::new(&cfg));
        let egress_plane = cfg.egress.enabled.then(|| {
            Arc::new(
                Egress::new(
                    &cfg,
                    topics.clone(),
                    producer.clone(),
                    contacts.clone() as Arc<dyn Contacts>,
                )
                .with_numbers(numbers.clone())
                .with_templates(templates.clone()),
            )
        });
        let egress = egress_plane.clone().map(|e| {
            let stop = rx.clone();
            tokio::spawn(async move {
                if let Err(err) = e.run(stop).await {
                    tracing::error!(error = %err, "egress stopped");
                }
            })
        });
        let contacts_stop = CancellationToken::new();
        let contacts_thread = spawn_contacts_sync(
            &cfg,
            &topics,
            contacts.clone(),
            ready.clone(),
            contacts_stop.clone(),
        )?;
        let (sharer, dedupe_thread) = match &share {
            Some(s) => (
                Some(tokio::spawn(s.clone().run(contacts_stop.clone()))),
                Some(spawn_dedupe_tail(
                    &cfg,
                    &topics,
                    dedupe.clone(),
                    *s.key(),
                    ready.clone(),
                    contacts_stop.clone(),
                )?),
            ),
            None => (None, None),
        };
        let numbers_ready = ready.clone();
        let (numbers_threads, numbers_tasks) = crate::numbers::sync::spawn(
            &cfg,
            &topics,
            producer.clone(),
            numbers.clone(),
            egress_plane.clone(),
            Box::new(move || numbers_ready.numbers.store(true, Ordering::SeqCst)),
            contacts_stop.clone(),
            rx.clone(),
        )?;
        let mut background = vec![
            tokio::spawn(kafka_pinger(
                producer.clone(),
                cfg.kafka.connection.diagnostics().clone(),
                ready.clone(),
                rx.clone(),
            )),
            tokio::spawn(gauges(
                all_producers.clone(),
                dedupe,
                egress_plane,
                contacts.clone(),
                ready.clone(),
                rx.clone(),
            )),
        ];
        background.extend(numbers_tasks);
        background.push(tokio::spawn(wabas_from_numbers(
            numbers.clone(),
            templates.clone(),
            rx.clone(),
        )));
        background.extend(crate::templates::spawn(
            &cfg,
            &topics,
            templates.clone(),
            producer.clone(),
            ready.clone(),
            contacts_stop.clone(),
            rx.clone(),
        )?);
        let media_thread = match &media {
            Some(m) => {
                background.push(tokio::spawn(m.clone().sweep_loop(rx.clone())));
                background.push(tokio::spawn(media_gauges(m.clone(), rx.clone())));
                Some(m.clone().spawn(rx.clone())?)
            }
            None => None,
        };
        for (name, tls) in [("public", public_tls), ("internal", internal_tls)] {
            if let Some(tls) = tls {
                background.push(tokio::spawn(crate::tls::watch(
                    name,
                    tls,
                    crate::tls::WATCH_INTERVAL,
                    rx.clone(),
                )));
            }
        }
        let scheme = |on: bool| if on { "https" } else { "http" };
        tracing::info!(
            public = %public_addr,
            public_scheme = scheme(cfg.tls.is_some()),
            internal = %internal_addr,
            internal_scheme = scheme(cfg.internal_tls.is_some()),
            client_certificates = cfg.internal_tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
            brokers = %cfg.kafka.connection.brokers(),
            security_protocol = cfg.kafka.connection.security_protocol(),
            "wagate serving"
        );
        Ok(Gateway {
            public_addr,
            internal_addr,
            ready,
            metrics,
            contacts,
            templates,
            shutdown,
            contacts_stop,
            contacts_thread: Some(contacts_thread),
            sharer,
            dedupe_thread,
            numbers,
            numbers_threads,
            egress,
            media_thread,
            media,
            servers,
            background,
            producers: all_producers,
            shutdown_timeout: cfg.shutdown_timeout,
            shutdown_grace: cfg.shutdown_grace,
        })
    }

    /// Waits until Kafka answered and `/readyz` is 200, or `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.ready.is_ready() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Graceful shutdown; returns true when everything drained in time.
    pub async fn shutdown(self) -> bool {
        let start = Instant::now();
        self.ready.draining.store(true, Ordering::Relaxed);
        metrics::gauge!(m::READY).set(0.0);
        if !self.shutdown_grace.is_zero() {
            // /readyz answers 503 while everything still serves: load
            // balancers stop sending new requests before the listeners close.
            tracing::info!(
                grace_ms = self.shutdown_grace.as_millis() as u64,
                "draining: not ready"
            );
            tokio::time::sleep(self.shutdown_grace).await;
        }
        self.shutdown.cancel();
        let mut drained = true;
        for s in self.servers {
            drained &= s.await.unwrap_or(false);
        }
        if let Some(e) = self.egress {
            let left = self.shutdown_timeout.saturating_sub(start.elapsed());
            drained &= tokio::time::timeout(left, e).await.is_ok();
        }
        // The media worker winds down (items in flight get 5 s) and commits.
        if let Some(t) = self.media_thread {
            let joined = tokio::task::spawn_blocking(move || t.join());
            let _ = tokio::time::timeout(Duration::from_secs(8), joined).await;
        }
        // The background tasks saw the same signal; they end at once.
        for b in self.background {
            let _ = tokio::time::timeout(Duration::from_secs(1), b).await;
        }
        self.contacts_stop.cancel();
        // The sync thread notices within one poll (100 ms); its consumer is
        // closed before this returns (and before `--dev` stops its broker).
        if let Some(s) = self.sharer {
            let _ = tokio::time::timeout(Duration::from_secs(1), s).await;
        }
        for t in [self.contacts_thread, self.dedupe_thread]
            .into_iter()
            .flatten()
        {
            let joined = tokio::task::spawn_blocking(move || t.join());
            let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
        }
        for t in self.numbers_threads {
            let joined = tokio::task::spawn_blocking(move || t.join());
            let _ = tokio::time::timeout(Duration::from_secs(2), joined).await;
        }
        let left = self
            .shutdown_timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(100));
        let producers = self.producers.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            // All flush (each one even if another failed) within one deadline.
            let end = std::time::Instant::now() + left;
            producers.iter().fold(true, |all, p| {
                let left = end.saturating_duration_since(std::time::Instant::now());
                p.flush(left).is_ok() && all
            })
        })
        .await
        .unwrap_or(false);
        drained &= flushed;
        tracing::info!(
            drained,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "wagate stopped"
        );
        drained
    }
}

/// Keeps `ready.kafka` true while a broker answers metadata requests; while
/// none does, `ready.kafka_problem` is what the clients reported (a TLS or
/// SASL setting to check).
async fn kafka_pinger(
    producer: KafkaProducer,
    diagnostics: crate::kafka::Diagnostics,
    ready: Arc<Readiness>,
    stop: CancellationToken,
) {
    let mut was = None;
    loop {
        let p = producer.clone();
        let ping = tokio::task::spawn_blocking(move || p.ping(Duration::from_secs(3)).is_ok());
        let ok = tokio::select! {
            _ = stop.cancelled() => return,
            r = ping => r.unwrap_or(false),
        };
        let problem = if ok {
            diagnostics.clear();
            None
        } else {
            diagnostics.recent(Duration::from_secs(300))
        };
        *ready.kafka_problem.lock().unwrap() = problem;
        ready.kafka.store(ok, Ordering::Relaxed);
        if was != Some(ok) {
            if ok {
                tracing::info!("kafka reachable");
            } else {
                match problem {
                    Some(p) => {
                        tracing::warn!("kafka unreachable (metadata request failed): {}", p.hint())
                    }
                    None => tracing::warn!("kafka unreachable (metadata request failed)"),
                }
            }
            was = Some(ok);
        }
        let pause = if ok {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(500)
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The template registry learns each number's WABA from `wa.numbers` too,
/// so an instance knows the WABA of a number whose webhooks another
/// instance received (the registry alone learns only from its own).
async fn wabas_from_numbers(
    numbers: Arc<crate::numbers::Numbers>,
    templates: Arc<crate::templates::Registry>,
    stop: CancellationToken,
) {
    let mut seen = u64::MAX;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let g = numbers.generation();
        if g == seen {
            continue;
        }
        seen = g;
        for n in numbers.all() {
            if let Some(waba) = &n.waba_id {
                templates.learn_number(&n.phone_number_id, waba);
            }
        }
    }
}

/// Publishes gauges that are sampled rather than counted, and sweeps the
/// dedupe set.
async fn gauges(
    producers: Vec<KafkaProducer>,
    dedupe: Arc<Dedupe>,
    egress: Option<Arc<Egress>>,
    contacts: Arc<MemoryContacts>,
    ready: Arc<Readiness>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        // A shard a second: each is swept about once a minute.
        dedupe.sweep_one(n as usize);
        let depth: i32 = producers.iter().map(|p| p.queue_depth()).sum();
        metrics::gauge!(m::KAFKA_PRODUCER_QUEUE_DEPTH).set(depth as f64);
        let st = dedupe.stats();
        metrics::gauge!(m::DEDUPE_ENTRIES).set(st.entries as f64);
        metrics::gauge!(m::DEDUPE_MEMORY_BYTES).set(st.approx_bytes as f64);
        metrics::gauge!(m::DEDUPE_LEARNED_ENTRIES).set(st.learned as f64);
        metrics::counter!(m::DEDUPE_EVICTED_EARLY).absolute(dedupe.evicted_early());
        metrics::gauge!(m::READY).set(if ready.is_ready() { 1.0 } else { 0.0 });
        metrics::gauge!(m::CONTACTS_ENTRIES).set(contacts.len() as f64);
        if let Some(e) = &egress {
            metrics::gauge!(m::EGRESS_BACKLOG).set(e.backlog() as f64);
            metrics::gauge!(m::EGRESS_OLDEST_AGE_SECONDS).set(e.oldest_age().as_secs_f64());
        }
    }
}

/// The media worker's gauges, every second.
async fn media_gauges(media: Arc<crate::media::Media>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => media.publish_gauges(),
        }
    }
}
