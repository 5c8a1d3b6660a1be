//! The MQTT connection task (rumqttc). The event loop is polled in its own
//! task and reconnects with exponential backoff; this task owns the offline
//! buffer, re-announces `status` after every (re)connect, answers commands
//! and publishes `health`. On a clean stop it publishes `offline` itself (a
//! graceful disconnect sends no last will).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Outgoing;
use super::payload::{CommandMsg, HealthMsg, ReplyMsg, SCHEMA_VERSION, StatusMsg};
use crate::config::MqttSettings;

/// What telemetry needs from the daemon (implemented in `app.rs`).
pub trait Control: Send + Sync + 'static {
    /// Run a command; `Err` becomes an error reply. No command deletes data.
    fn command(&self, name: &str, msg: &CommandMsg) -> Result<serde_json::Value, String>;
    /// Current health (the task fills `events_dropped`).
    fn health(&self) -> HealthMsg;
    /// Current status (`online`, `draining`, `paused` or `stopping`).
    fn status(&self) -> StatusMsg;
}

enum Conn {
    Up,
    Down(String),
    /// The broker answered the command subscription: `false` when it
    /// refused it (its ACL does not let this client read the topic).
    Subscribed(bool),
    /// Messages the client had taken but the broker never acknowledged
    /// when the connection failed: the client would discard them at the
    /// next connection (a clean session), so they go back to the buffer.
    Requeue(Vec<Outgoing>),
    /// `retained`: delivered as a retained message (refused, never run).
    Command {
        topic: String,
        payload: Vec<u8>,
        retained: bool,
    },
}

/// The largest message the box sends. A bigger one would end the
/// connection at every attempt (and come back to the buffer each time):
/// it is dropped and counted instead.
const MAX_PACKET: usize = 256 << 10;

/// Topic prefix of a device.
pub fn prefix(device_id: &str) -> String {
    format!("petrestore/v1/{device_id}/")
}

/// The publications among a failed connection's pending requests, as
/// buffer entries: job events and command replies. `status` and `health`
/// are left out: both are sent afresh at every connection.
fn requeue(prefix: &str, pending: std::collections::VecDeque<rumqttc::Request>) -> Vec<Outgoing> {
    pending
        .into_iter()
        .filter_map(|r| match r {
            rumqttc::Request::Publish(p) => {
                let topic = p.topic.strip_prefix(prefix)?.to_string();
                (topic != "status" && topic != "health").then(|| Outgoing { topic, payload: p.payload.to_vec(), retain: p.retain })
            }
            _ => None,
        })
        .collect()
}

/// The `offline` status the broker publishes when the box vanishes. Its
/// `since_ms` is the time of the connection it is sent with (the box
/// cannot stamp the moment it dies): made again before every reconnect.
fn last_will(device_id: &str) -> LastWill {
    let will = StatusMsg {
        schema_version: SCHEMA_VERSION,
        state: "offline".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        device_id: device_id.into(),
        model: None,
        engine: None,
        since_ms: crate::journal::now_ms(),
    };
    LastWill::new(format!("{}status", prefix(device_id)), serde_json::to_vec(&will).expect("payloads serialize"), QoS::AtLeastOnce, true)
}

/// Read and parse `[mqtt]`'s TLS files as the connection will: the CA and
/// the client certificate hold PEM certificates, the key a private key.
/// Errors name the key and the file. Returns the files' bytes (CA, then
/// the client's certificate and key), which the client parses again.
pub fn tls_files(tls: &crate::config::MqttTls) -> Result<(Vec<u8>, Option<(Vec<u8>, Vec<u8>)>), String> {
    let bytes = |key: &str, p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{key} {}: {e}", p.display()));
    crate::pem::certs("mqtt.ca_file", &tls.ca_file)?;
    let client = match &tls.client {
        None => None,
        Some((c, k)) => {
            crate::pem::certs("mqtt.cert_file", c)?;
            crate::pem::private_key("mqtt.key_file", k)?;
            Some((bytes("mqtt.cert_file", c)?, bytes("mqtt.key_file", k)?))
        }
    };
    Ok((bytes("mqtt.ca_file", &tls.ca_file)?, client))
}

fn options(cfg: &MqttSettings, device_id: &str) -> Result<MqttOptions, String> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_session(true);
    // rumqttc's default is 10 KiB each way; a larger packet ends the
    // connection. Commands are small: up to 1 MiB is read, so only a
    // retained message beyond that on a command topic (clear it) would end
    // every connection.
    o.set_max_packet_size(1 << 20, MAX_PACKET);
    o.set_last_will(last_will(device_id));
    if let Some(tls) = &cfg.tls {
        let (ca, client_auth) = tls_files(tls)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
    }
    Ok(o)
}

/// Run telemetry until `shutdown`.
pub async fn run(
    cfg: MqttSettings,
    device_id: String,
    mut rx: mpsc::Receiver<Outgoing>,
    dropped_channel: Arc<AtomicU64>,
    control: Arc<dyn Control>,
    state_changed: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let opts = match options(&cfg, &device_id) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "telemetry disabled: cannot set up the MQTT connection");
            return;
        }
    };
    let pre = prefix(&device_id);
    let (client, mut eventloop) = AsyncClient::new(opts, cfg.buffer + 64);
    // Whether the connection is up, as the poller last saw it: cleared the
    // moment it fails, so nothing newer is handed to the client after the
    // unacknowledged messages were taken back (they keep their order).
    let link_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (conn_tx, mut conn_rx) = mpsc::channel::<Conn>(64);
    let stop_poll = CancellationToken::new();
    let poller = {
        let stop = stop_poll.clone();
        let device_id = device_id.clone();
        let pre = pre.clone();
        let link_up = link_up.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            // A connection the broker accepts and then drops at once (a
            // duplicate client id, a packet it refuses) must not reconnect
            // in a tight loop: the backoff starts again only after a
            // connection has held for a minute.
            let mut up_since: Option<std::time::Instant> = None;
            loop {
                let ev = tokio::select! {
                    ev = eventloop.poll() => ev,
                    _ = stop.cancelled() => return,
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        up_since = Some(std::time::Instant::now());
                        link_up.store(true, Ordering::SeqCst);
                        let _ = conn_tx.send(Conn::Up).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let ok = a.return_codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                        let _ = conn_tx.send(Conn::Subscribed(ok)).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ =
                            conn_tx.send(Conn::Command { topic: p.topic.clone(), payload: p.payload.to_vec(), retained: p.retain }).await;
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        link_up.store(false, Ordering::SeqCst);
                        // rumqttc moves what was unacknowledged or still
                        // queued to `pending` and clears it when the broker
                        // answers without a session: take it back first.
                        let lost = requeue(&pre, std::mem::take(&mut eventloop.pending));
                        if !lost.is_empty() {
                            let _ = conn_tx.send(Conn::Requeue(lost)).await;
                        }
                        let _ = conn_tx.send(Conn::Down(e.to_string())).await;
                        if up_since.take().is_some_and(|t| t.elapsed() >= Duration::from_secs(60)) {
                            backoff = Duration::from_millis(250);
                        }
                        // the next connection's will carries its own time
                        eventloop.mqtt_options.set_last_will(last_will(&device_id));
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
    };

    let mut connected = false;
    let mut subscribed = false;
    // the broker refused the command subscription on this connection
    let mut refused = false;
    let mut warned = false;
    let mut buffer: VecDeque<Outgoing> = VecDeque::with_capacity(cfg.buffer.min(4096));
    let dropped_offline = AtomicU64::new(0);
    let mut health_tick = tokio::time::interval(cfg.health_interval);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let publish =
        |client: &AsyncClient, o: &Outgoing| client.try_publish(format!("{pre}{}", o.topic), QoS::AtLeastOnce, o.retain, o.payload.clone());
    // Hand buffered messages to the client until its queue is full.
    let flush = |client: &AsyncClient, buffer: &mut VecDeque<Outgoing>| {
        while let Some(o) = buffer.front() {
            if !link_up.load(Ordering::SeqCst) {
                break;
            }
            if publish(client, o).is_err() {
                break;
            }
            buffer.pop_front();
        }
    };
    let buffer_it = |buffer: &mut VecDeque<Outgoing>, o: Outgoing| {
        if o.payload.len() + pre.len() + o.topic.len() + 16 > MAX_PACKET {
            tracing::warn!(topic = %o.topic, bytes = o.payload.len(), "MQTT message too large to send: dropped");
            dropped_offline.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if buffer.len() >= cfg.buffer {
            buffer.pop_front();
            dropped_offline.fetch_add(1, Ordering::Relaxed);
        }
        buffer.push_back(o);
    };
    let health = |control: &Arc<dyn Control>, refused: bool| {
        let mut h = control.health();
        h.events_dropped = dropped_channel.load(Ordering::Relaxed) + dropped_offline.load(Ordering::Relaxed);
        if refused {
            let refusal = "the broker refuses the command subscription: commands are not received";
            h.last_error = Some(match h.last_error.take() {
                Some(e) => format!("{refusal}; {e}"),
                None => refusal.into(),
            });
        }
        Outgoing { topic: "health".into(), payload: serde_json::to_vec(&h).expect("payloads serialize"), retain: false }
    };
    let status = |control: &Arc<dyn Control>| Outgoing {
        topic: "status".into(),
        payload: serde_json::to_vec(&control.status()).expect("payloads serialize"),
        retain: true,
    };

    loop {
        tokio::select! {
            c = conn_rx.recv() => match c {
                Some(Conn::Up) => {
                    connected = true;
                    warned = false;
                    tracing::info!(broker = %format!("{}:{}", cfg.host, cfg.port), "MQTT connected");
                    // With the client's queue full the request is refused:
                    // tried again at every health tick until it is queued
                    // (never awaited here, which could wedge this loop)
                    subscribed = client.try_subscribe(format!("{pre}cmd/+"), QoS::AtLeastOnce).is_ok();
                    let _ = publish(&client, &status(&control));
                    flush(&client, &mut buffer);
                    let _ = publish(&client, &health(&control, refused));
                }
                Some(Conn::Subscribed(true)) => {
                    if refused {
                        tracing::info!(topic = %format!("{pre}cmd/+"), "MQTT: the broker accepts the command subscription now");
                    }
                    refused = false;
                }
                Some(Conn::Subscribed(false)) => {
                    // Commands would never arrive and nothing would say so:
                    // said once per connection, asked again at every health
                    // tick (an ACL fixed on the broker is picked up).
                    if !refused {
                        tracing::error!(topic = %format!("{pre}cmd/+"), broker = %format!("{}:{}", cfg.host, cfg.port),
                            "MQTT: the broker refused the command subscription (its ACL does not let this client read the topic): \
                             commands are not received; asking again at every health tick");
                    }
                    refused = true;
                    subscribed = false;
                }
                Some(Conn::Requeue(lost)) => {
                    // oldest first, ahead of what waited here; past the
                    // bound the oldest go, counted
                    tracing::debug!(messages = lost.len(), "MQTT messages the broker did not acknowledge queued again");
                    for o in lost.into_iter().rev() {
                        buffer.push_front(o);
                    }
                    while buffer.len() > cfg.buffer {
                        buffer.pop_front();
                        dropped_offline.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Conn::Down(e)) => {
                    if connected {
                        tracing::warn!(error = %e, "MQTT connection lost; buffering events and reconnecting");
                    } else if !warned {
                        tracing::warn!(error = %e, broker = %format!("{}:{}", cfg.host, cfg.port), "MQTT broker unreachable; buffering events and retrying");
                        warned = true;
                    } else {
                        tracing::debug!(error = %e, "MQTT broker still unreachable");
                    }
                    connected = false;
                    subscribed = false;
                    refused = false;
                }
                Some(Conn::Command { topic, payload, retained }) => {
                    let Some(name) = topic.strip_prefix(&format!("{pre}cmd/")).map(str::to_string) else { continue };
                    // A zero-byte message is what clears a retained one (the
                    // broker forwards it to us too): never a command.
                    if payload.is_empty() {
                        tracing::debug!(topic = %topic, "empty MQTT message on a command topic ignored");
                        continue;
                    }
                    let (reply, state_changed) = if retained {
                        // a retained command is replayed at every connection (a
                        // drain published with retain would drain the box at
                        // every reconnect): refused, never run
                        refuse_retained(&device_id, &name, &payload)
                    } else {
                        answer(&device_id, &name, &payload, &control)
                    };
                    let o = Outgoing { topic: format!("cmd/{name}/reply"), payload: serde_json::to_vec(&reply).expect("payloads serialize"), retain: false };
                    buffer_it(&mut buffer, o);
                    if connected {
                        flush(&client, &mut buffer);
                    }
                    if state_changed && connected {
                        let _ = publish(&client, &status(&control));
                    }
                }
                None => break,
            },
            o = rx.recv() => match o {
                Some(o) => {
                    // Through the buffer, so order is kept and anything left
                    // from a full client queue goes first.
                    buffer_it(&mut buffer, o);
                    if connected {
                        flush(&client, &mut buffer);
                    }
                }
                None => break,
            },
            _ = health_tick.tick() => {
                if connected && !subscribed {
                    subscribed = client.try_subscribe(format!("{pre}cmd/+"), QoS::AtLeastOnce).is_ok();
                    if !subscribed && !refused {
                        tracing::warn!("MQTT: the command subscription is not queued yet; trying again at the next health tick");
                    }
                }
                if connected {
                    flush(&client, &mut buffer);
                    let _ = publish(&client, &health(&control, refused));
                }
            }
            _ = state_changed.notified() => {
                if connected {
                    let _ = publish(&client, &status(&control));
                }
            }
            _ = shutdown.cancelled() => break,
        }
    }
    // What the stop itself produced (a requeued restoration's event) goes
    // out before offline; what cannot is said in the log.
    while let Ok(o) = rx.try_recv() {
        buffer_it(&mut buffer, o);
    }
    if connected {
        flush(&client, &mut buffer);
    }
    if !buffer.is_empty() {
        tracing::warn!(events = buffer.len(), "MQTT events not sent before the stop");
    }

    // Clean stop: say offline ourselves, then disconnect.
    if connected {
        let mut st = control.status();
        st.state = "offline".into();
        st.since_ms = crate::journal::now_ms();
        let _ = client.try_publish(format!("{pre}status"), QoS::AtLeastOnce, true, serde_json::to_vec(&st).expect("payloads serialize"));
        let _ = client.try_disconnect();
        if tokio::time::timeout(Duration::from_secs(3), poller).await.is_err() {
            tracing::warn!("MQTT disconnect did not complete in 3 s");
        }
    } else {
        stop_poll.cancel();
        let _ = poller.await;
    }
    stop_poll.cancel();
    tracing::info!("telemetry stopped");
}

/// The reply to a command delivered as a retained message.
fn refuse_retained(device_id: &str, name: &str, payload: &[u8]) -> (ReplyMsg, bool) {
    let correlation_id = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("correlation_id").and_then(|c| c.as_str()).map(str::to_string));
    tracing::warn!(command = name, "MQTT command refused: it was a retained message");
    let reply = ReplyMsg {
        schema_version: SCHEMA_VERSION,
        device_id: device_id.to_string(),
        command: name.to_string(),
        correlation_id,
        ok: false,
        error: Some(format!(
            "retained command not run: the broker replays a retained message at every connection; publish commands without \
             retain, and clear this one (an empty retained message on cmd/{name})"
        )),
        result: None,
    };
    (reply, false)
}

/// Answer a command: the reply, and whether the daemon's state changed.
fn answer(device_id: &str, name: &str, payload: &[u8], control: &Arc<dyn Control>) -> (ReplyMsg, bool) {
    let mut reply = ReplyMsg {
        schema_version: SCHEMA_VERSION,
        device_id: device_id.to_string(),
        command: name.to_string(),
        correlation_id: None,
        ok: false,
        error: None,
        result: None,
    };
    let msg: CommandMsg = if payload.iter().all(|b| b.is_ascii_whitespace()) {
        CommandMsg::default()
    } else {
        match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                // Try to echo a correlation id even from a payload we refuse.
                reply.correlation_id = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("correlation_id").and_then(|c| c.as_str()).map(str::to_string));
                reply.error = Some(format!("malformed command payload: {e}; expected JSON like {{\"correlation_id\": \"...\"}}"));
                return (reply, false);
            }
        }
    };
    reply.correlation_id = msg.correlation_id.clone();
    match control.command(name, &msg) {
        Ok(v) => {
            reply.ok = true;
            reply.result = Some(v);
        }
        Err(e) => reply.error = Some(e),
    }
    let changed = reply.ok && matches!(name, "pause" | "resume" | "drain");
    tracing::info!(command = name, ok = reply.ok, error = ?reply.error, "MQTT command");
    (reply, changed)
}
