//! Ingest: the DICOM SCP. Accepts associations (a permit taken before
//! `accept`, so at most `max_associations` are served), answers C-ECHO, and
//! hands each complete C-STORE data set to a [`StoreSink`] on a blocking
//! thread: the daemon's sink spools and journals it ([`store::SpoolSink`]),
//! the demo's receiver writes files.
//!
//! Every PDU is hostile until parsed: a malformed PDU, an unknown
//! presentation context or an oversized data set ends the association with
//! an A-ABORT; a data set that cannot be stored gets a failure status. The
//! server keeps serving the next association either way.

pub mod access;
pub mod gate;
pub mod materialize;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dicom_ul::Pdu;
use dicom_ul::association::server::ServerAssociationOptions;
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PDataValue, PDataValueType, PresentationContextResultReason};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AllowedCaller;
use crate::dicom::dimse::{self, Command};

/// Largest data set we buffer for one C-STORE (a PET slice is well under
/// 1 MiB; an Enhanced PET multi-frame object can be a few hundred MiB).
const MAX_DATASET_BYTES: usize = 1 << 30;

/// What the sink decided for one instance.
#[derive(Debug, Clone)]
pub struct StoreStatus {
    pub status: u16,
    pub comment: Option<String>,
}

/// Facts about the association an instance arrived on.
#[derive(Debug, Clone)]
pub struct StoreContext {
    pub calling_ae: String,
    pub peer: SocketAddr,
    pub transfer_syntax: String,
    pub abstract_syntax: String,
}

/// Where received data sets go. Called on a blocking thread: it may fsync.
pub trait StoreSink: Send + Sync + 'static {
    fn store(&self, ctx: &StoreContext, cmd: &Command, dataset: Vec<u8>) -> StoreStatus;

    /// An archive's storage commitment report (N-EVENT-REPORT) for a
    /// request this node made. Receivers that make none refuse it.
    fn commitment_report(&self, _ctx: &StoreContext, _report: crate::dicom::commitment::Report) -> StoreStatus {
        StoreStatus { status: dimse::status::UNRECOGNIZED_OPERATION, comment: Some("this node requests no storage commitment".into()) }
    }
}

/// The counters behind `max_associations`, `max_associations_per_peer` and
/// `max_buffered_bytes`: one set per [`ScpConfig`], whichever listener
/// serves a connection.
#[derive(Debug, Clone, Default)]
pub struct SharedLimits(Arc<std::sync::OnceLock<Limits>>);

#[derive(Clone)]
struct Limits {
    /// Association slots (taken after the A-ASSOCIATE-RQ, [`gate`]).
    permits: Arc<Semaphore>,
    /// Connections open at all, associated or not (taken before accept).
    places: Arc<Semaphore>,
    peers: gate::PeerCounts,
    buffered: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").field("slots", &self.permits.available_permits()).finish_non_exhaustive()
    }
}

impl SharedLimits {
    fn get(&self, cfg: &ScpConfig) -> Limits {
        self.0
            .get_or_init(|| Limits {
                permits: Arc::new(Semaphore::new(cfg.max_associations)),
                places: Arc::new(Semaphore::new(cfg.max_associations * 4)),
                peers: gate::PeerCounts::default(),
                buffered: Arc::new(AtomicUsize::new(0)),
            })
            .clone()
    }
}

/// SCP settings (the daemon's come from `[dicom]`).
#[derive(Debug, Clone)]
pub struct ScpConfig {
    pub ae_title: String,
    /// `None`: any caller (the demo's built-in receiver).
    pub allowed_callers: Option<Vec<AllowedCaller>>,
    pub abstract_syntaxes: Vec<String>,
    pub max_associations: usize,
    /// Open connections from one IP address ([`gate`]).
    pub max_associations_per_peer: usize,
    /// ARTIM: time for the A-ASSOCIATE-RQ, and for a free slot ([`gate`]).
    pub artim_timeout: Duration,
    pub max_pdu_length: u32,
    /// Bytes of data sets being received, all associations together; an
    /// association that would go beyond is aborted (bounded memory).
    pub max_buffered_bytes: usize,
    pub idle_timeout: Duration,
    /// The daemon's live settings: `dicom.allowed_callers` is read from them
    /// for every new association, so `reload` applies at once.
    pub live: Option<Arc<crate::config::LiveSettings>>,
    /// The limits above as counters, made by the first listener and shared
    /// by every listener of this configuration (plain and TLS together).
    pub shared: SharedLimits,
    /// Set by `drain`: new associations are rejected, open ones finish.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when open associations must end now (the shutdown's drain
    /// budget is spent): each is aborted between PDUs. What was
    /// acknowledged is durable; the sender retries the rest.
    pub close: CancellationToken,
}

/// Serve associations on `listener` until `shutdown`; then stop accepting,
/// let open associations finish (they are tracked by `tracker`) and return.
pub async fn serve(
    listener: TcpListener,
    cfg: Arc<ScpConfig>,
    sink: Arc<dyn StoreSink>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    serve_with(listener, cfg, sink, shutdown, tracker, None).await
}

/// [`serve`], speaking DICOM over TLS only when `tls` is given.
pub async fn serve_with(
    listener: TcpListener,
    cfg: Arc<ScpConfig>,
    sink: Arc<dyn StoreSink>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    // Association slots are taken in `handle_association`, after a whole
    // A-ASSOCIATE-RQ has arrived (see [`gate`]). Connection places bound the
    // connections that are open at all (associated or not); they are taken
    // before accept, so beyond them connections wait in the kernel's queue.
    // All listeners of this configuration count against the same limits.
    let Limits { permits, places, peers, buffered } = cfg.shared.get(&cfg);
    let mut backoff = Duration::from_millis(10);
    loop {
        let place = tokio::select! {
            p = places.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (socket, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => { backoff = Duration::from_millis(10); x }
                Err(e) => {
                    // EMFILE and friends: wait and retry rather than spin.
                    tracing::warn!(error = %e, "accept failed; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(peer_slot) = peers.try_open(peer.ip(), cfg.max_associations_per_peer) else {
            tracing::warn!(%peer, open = cfg.max_associations_per_peer, "connection closed: this address already has dicom.max_associations_per_peer connections open");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let cfg = cfg.clone();
        let sink = sink.clone();
        let tls = tls.clone();
        let permits = permits.clone();
        let budget = Budget { used: buffered.clone(), max: cfg.max_buffered_bytes, held: 0 };
        tracker.spawn(async move {
            let _place = place;
            let _peer_slot = peer_slot;
            if let Err(e) = handle_association(socket, peer, &cfg, permits, sink, tls, budget).await {
                tracing::warn!(%peer, error = %e, "association ended with an error");
            }
        });
    }
    tracing::info!("DICOM listener closed; open associations may finish");
}

/// Per-presentation-context reassembly of fragmented P-DATA values.
#[derive(Default)]
struct Pending {
    command: Vec<u8>,
    command_done: Option<Command>,
    dataset: Vec<u8>,
}

/// One association's share of `max_buffered_bytes`: what it holds goes back
/// when a data set has been stored, and all of it when the association
/// ends, however it ends.
struct Budget {
    used: Arc<AtomicUsize>,
    max: usize,
    held: usize,
}

impl Budget {
    /// Take `n` more bytes, or refuse if all associations together would
    /// hold more than the maximum (never waits: no deadlock between senders).
    fn take(&mut self, n: usize) -> bool {
        let ok = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u + n <= self.max).then_some(u + n)).is_ok();
        if ok {
            self.held += n;
        }
        ok
    }
    fn give_back(&mut self, n: usize) {
        let n = n.min(self.held);
        self.held -= n;
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        let n = self.held;
        self.give_back(n);
    }
}

/// Load `[dicom.tls]`: our certificate chain and key, and (mutual TLS) the
/// CAs whose certificates callers must present. Errors name the file.
pub fn tls_config(t: &crate::config::DicomTls) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = crate::pem::certs("dicom.tls.cert", &t.cert)?;
    let key = crate::pem::private_key("dicom.tls.key", &t.key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match &t.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in crate::pem::certs("dicom.tls.client_ca", ca)? {
                roots.add(c).map_err(|e| format!("dicom.tls.client_ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("dicom.tls.client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config =
        builder.with_single_cert(certs, key).map_err(|e| format!("dicom.tls.cert/key ({}, {}): {e}", t.cert.display(), t.key.display()))?;
    Ok(Arc::new(config))
}

async fn handle_association(
    mut socket: TcpStream,
    peer: SocketAddr,
    cfg: &ScpConfig,
    permits: Arc<Semaphore>,
    sink: Arc<dyn StoreSink>,
    tls: Option<Arc<rustls::ServerConfig>>,
    budget: Budget,
) -> Result<(), String> {
    // Consoles may store; archives with storage commitment may only report.
    let (stores, reports) = match &cfg.live {
        Some(l) => {
            let s = l.get();
            (Some(s.dicom.allowed_callers.clone()), access::commitment_callers(&s.destinations))
        }
        None => (cfg.allowed_callers.clone(), Vec::new()),
    };
    // one reading of the live settings for both lists
    let allowed = stores.clone().map(|s| s.into_iter().chain(reports.iter().cloned()).collect());
    let draining = cfg.draining.load(std::sync::atomic::Ordering::Relaxed);
    // draining: an archive reporting storage commitment is still let in (the
    // jobs running finish only with its report), to report, not to store
    let may_store = move |calling: &str| stores.as_ref().is_none_or(|a| access::allows(a, calling, peer.ip()));
    let mut opts = ServerAssociationOptions::new()
        .ae_access_control(access::CallerPolicy { allowed, peer: peer.ip(), draining, reporters: reports.clone() })
        .ae_title(cfg.ae_title.clone())
        .max_pdu_length(cfg.max_pdu_length)
        .read_timeout(cfg.idle_timeout)
        .write_timeout(cfg.idle_timeout)
        // A PDU longer than the maximum we announced (PS3.8 9.3.1) is
        // refused at its header, before its body is buffered: without this a
        // sender's declared 4 GiB is read into memory until it arrives or
        // the idle timeout ends it. The association is aborted and the log
        // names the lengths.
        .strict(true)
        // An archive reporting storage commitment on its own association
        // acts as the SCP of that SOP class: accept that role.
        .with_negotiation(access::CommitmentRoles);
    for a in &cfg.abstract_syntaxes {
        opts = opts.with_abstract_syntax(a.clone());
    }
    for ts in crate::dicom::SUPPORTED_TS {
        opts = opts.with_transfer_syntax(*ts);
    }
    let artim = cfg.artim_timeout;
    // Plain DICOM: the request is checked before it may take a slot. Over
    // TLS the bytes are encrypted: the client's ClientHello must be there
    // before it may wait for a slot; the handshake and the request together
    // must then finish within ARTIM, holding the slot meanwhile.
    if tls.is_some() {
        gate::await_client_hello(&socket, artim).await.map_err(|r| r.to_string())?;
    }
    if tls.is_none() {
        let calling = gate::await_request(&mut socket, artim, cfg.max_pdu_length).await.map_err(|r| r.to_string())?;
        // draining: refused as transient, so the console sends it again
        // later (over TLS the refusal comes from the association layer,
        // as permanent)
        if draining && !access::allows(&reports, &calling, peer.ip()) {
            tracing::warn!(%peer, "association rejected: draining");
            return Err(gate::reject_draining(&mut socket).await.to_string());
        }
    }
    let _permit = match tokio::time::timeout(artim, permits.acquire_owned()).await {
        Ok(p) => p.expect("semaphore never closed"),
        // over TLS a plain A-ASSOCIATE-RJ would read as a protocol error:
        // the connection is closed instead
        Err(_) if tls.is_some() => return Err(format!("every association slot stayed busy for {artim:?}: TLS connection closed")),
        Err(_) => return Err(gate::reject_busy(&mut socket, artim).await.to_string()),
    };
    let in_time = |what: &'static str| move |_| format!("{what} not finished within the ARTIM timeout ({artim:?}): closed");
    match tls {
        None => {
            let assoc = tokio::time::timeout(artim, opts.establish_async(socket))
                .await
                .map_err(in_time("association"))?
                .map_err(|e| format!("association refused: {e}"))?;
            let store = may_store(assoc_calling(&assoc).as_str());
            serve_association(assoc, peer, sink, budget, cfg.close.clone(), store, draining).await
        }
        Some(t) => {
            let assoc = tokio::time::timeout(artim, opts.tls_config(t).establish_tls_async(socket))
                .await
                .map_err(in_time("TLS handshake and association"))?
                .map_err(|e| format!("TLS association refused: {e}"))?;
            let store = may_store(assoc_calling(&assoc).as_str());
            serve_association(assoc, peer, sink, budget, cfg.close.clone(), store, draining).await
        }
    }
}

fn assoc_calling<S>(assoc: &dicom_ul::association::server::AsyncServerAssociation<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    use dicom_ul::association::Association;
    assoc.peer_ae_title().trim().to_owned()
}

/// Serve one established association. `may_store`: the caller is in
/// `dicom.allowed_callers` (an archive admitted only to report storage
/// commitment gets its C-STOREs refused). `draining`: the association was
/// let in while draining, to report storage commitment: its C-STOREs are
/// refused as transient (out of resources), so the sender sends again.
async fn serve_association<S>(
    mut assoc: dicom_ul::association::server::AsyncServerAssociation<S>,
    peer: SocketAddr,
    sink: Arc<dyn StoreSink>,
    mut budget: Budget,
    close: CancellationToken,
    may_store: bool,
    draining: bool,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let calling_ae = {
        use dicom_ul::association::Association;
        assoc.peer_ae_title().trim().to_owned()
    };
    tracing::info!(%peer, calling = %calling_ae, "association accepted");

    let contexts: HashMap<u8, (String, String)> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        // UIDs padded to even length with NUL by some requestors
        .map(|pc| (pc.id, (uid(&pc.abstract_syntax), uid(&pc.transfer_syntax))))
        .collect();
    let mut pending: HashMap<u8, Pending> = HashMap::new();
    let mut stored = 0u32;

    loop {
        let received = tokio::select! {
            r = assoc.receive() => r,
            _ = close.cancelled() => {
                let _ = abort(assoc).await;
                return Err(format!("aborted at shutdown after {stored} instances: the drain budget is spent"));
            }
        };
        let pdu = match received {
            Ok(p) => p,
            Err(e) => {
                let _ = abort(assoc).await;
                return Err(format!("receive failed after {stored} instances: {}", error_chain(&e)));
            }
        };
        match pdu {
            Pdu::PData { data } => {
                for value in data {
                    let Some((abstract_syntax, ts)) = contexts.get(&value.presentation_context_id) else {
                        let _ = abort(assoc).await;
                        return Err(format!("P-DATA on unknown presentation context {}", value.presentation_context_id));
                    };
                    let pcid = value.presentation_context_id;
                    let p = pending.entry(pcid).or_default();
                    match value.value_type {
                        PDataValueType::Command => {
                            // PS3.7 8.2: a message's command and data set are not
                            // interleaved with another message's on one context
                            if p.command_done.is_some() || !p.dataset.is_empty() {
                                let _ = abort(assoc).await;
                                return Err(format!(
                                    "a command on presentation context {pcid} before the data set of the one before ended \
                                     ({} bytes of it received)",
                                    p.dataset.len()
                                ));
                            }
                            p.command.extend_from_slice(&value.data);
                            if p.command.len() > 1 << 20 {
                                let _ = abort(assoc).await;
                                return Err("command set larger than 1 MiB".into());
                            }
                            if !value.is_last {
                                continue;
                            }
                            let cmd = match Command::parse(&std::mem::take(&mut p.command)) {
                                Ok(c) => c,
                                Err(e) => {
                                    let _ = abort(assoc).await;
                                    return Err(format!("unreadable command: {e}"));
                                }
                            };
                            if cmd.has_dataset {
                                p.command_done = Some(cmd);
                                continue;
                            }
                            let rsp = match cmd.command_field {
                                dimse::C_ECHO_RQ => dimse::response(&cmd, dimse::status::SUCCESS, None),
                                _ => {
                                    let _ = abort(assoc).await;
                                    return Err(format!("unsupported DIMSE command 0x{:04X}", cmd.command_field));
                                }
                            };
                            send_command(&mut assoc, pcid, rsp).await?;
                        }
                        PDataValueType::Data => {
                            if p.command_done.is_none() {
                                let _ = abort(assoc).await;
                                return Err("data set before its command".into());
                            }
                            if p.dataset.len() + value.data.len() > MAX_DATASET_BYTES {
                                let _ = abort(assoc).await;
                                return Err("data set larger than 1 GiB".into());
                            }
                            if !budget.take(value.data.len()) {
                                let _ = abort(assoc).await;
                                return Err(format!(
                                    "aborted: the data sets being received by all associations would exceed \
                                     dicom.max_buffered_mb ({} MiB); the sender can retry",
                                    budget.max >> 20
                                ));
                            }
                            p.dataset.extend_from_slice(&value.data);
                            if !value.is_last {
                                continue;
                            }
                            let cmd = p.command_done.take().expect("checked above");
                            let dataset = std::mem::take(&mut p.dataset);
                            let held = dataset.len();
                            let ctx = || StoreContext {
                                calling_ae: calling_ae.clone(),
                                peer,
                                transfer_syntax: ts.clone(),
                                abstract_syntax: abstract_syntax.clone(),
                            };
                            let status = if cmd.command_field == dimse::N_EVENT_REPORT_RQ
                                && abstract_syntax.trim_end_matches('\0') == crate::dicom::commitment::PUSH_MODEL
                            {
                                match commitment_report(&dataset, ts) {
                                    Ok(report) => tokio::task::block_in_place(|| sink.commitment_report(&ctx(), report)),
                                    Err(e) => StoreStatus { status: dimse::status::PROCESSING_FAILURE, comment: Some(e) },
                                }
                            } else if cmd.command_field != dimse::C_STORE_RQ {
                                StoreStatus {
                                    status: dimse::status::UNRECOGNIZED_OPERATION,
                                    comment: Some(format!("unsupported command 0x{:04X}", cmd.command_field)),
                                }
                            } else if uid(&cmd.affected_sop_class) != *abstract_syntax {
                                // PS3.7 9.3.1: a C-STORE travels on a context of its own SOP
                                // class (what dicom.non_pet refuses is never negotiated)
                                tracing::warn!(%peer, calling = %calling_ae, sop_class = %uid(&cmd.affected_sop_class),
                                    context = %abstract_syntax, "C-STORE refused: its SOP Class differs from its presentation context's");
                                StoreStatus {
                                    status: dimse::status::SOP_CLASS_NOT_SUPPORTED,
                                    comment: Some("SOP Class differs from the presentation context's".into()),
                                }
                            } else if draining {
                                StoreStatus {
                                    status: dimse::status::OUT_OF_RESOURCES,
                                    comment: Some("draining for maintenance: send it again later".into()),
                                }
                            } else if !may_store {
                                StoreStatus {
                                    status: dimse::status::NOT_AUTHORIZED,
                                    comment: Some(format!("{calling_ae} may report storage commitment, not store")),
                                }
                            } else {
                                let ctx = ctx();
                                // fsync work on this worker thread: block_in_place hands
                                // the thread's other tasks to another worker instead of
                                // paying a hop to the blocking pool per instance (the
                                // sender waits for our answer, so latency is throughput).
                                tokio::task::block_in_place(|| sink.store(&ctx, &cmd, dataset))
                            };
                            // The sink has stored (or refused) it and let go of the bytes.
                            budget.give_back(held);
                            if dimse::status::is_ok(status.status) {
                                stored += 1;
                            }
                            let rsp = dimse::response(&cmd, status.status, status.comment.as_deref());
                            send_command(&mut assoc, pcid, rsp).await?;
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                let _ = assoc.send(&Pdu::ReleaseRP).await;
                tracing::info!(%peer, calling = %calling_ae, stored, "association released");
                return Ok(());
            }
            Pdu::AbortRQ { .. } => {
                tracing::info!(%peer, calling = %calling_ae, stored, "association aborted by peer");
                return Ok(());
            }
            other => {
                let _ = abort(assoc).await;
                return Err(format!("unexpected PDU {other:?}"));
            }
        }
    }
}

/// Read a storage commitment report's data set.
fn commitment_report(dataset: &[u8], ts: &str) -> Result<crate::dicom::commitment::Report, String> {
    let ts = ts.trim_end_matches('\0');
    let syntax = crate::dicom::transfer_syntax(ts).ok_or_else(|| format!("transfer syntax {ts} not supported"))?;
    crate::dicom::guard::check_lengths(dataset, ts != crate::dicom::IMPLICIT_VR_LE)?;
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(dataset, syntax).map_err(|e| format!("unreadable report: {e}"))?;
    crate::dicom::commitment::Report::parse(&obj)
}

async fn send_command<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send>(
    assoc: &mut dicom_ul::association::server::AsyncServerAssociation<S>,
    pcid: u8,
    data: Vec<u8>,
) -> Result<(), String> {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue { presentation_context_id: pcid, value_type: PDataValueType::Command, is_last: true, data }],
        })
        .await
        .map_err(|e| format!("send response failed: {e}"))
}

/// An error and its causes on one line (the upper layer's outer error
/// says only "failed to receive pdu").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn abort<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send>(
    mut assoc: dicom_ul::association::server::AsyncServerAssociation<S>,
) -> Result<(), String> {
    let pdu = Pdu::AbortRQ { source: AbortRQSource::ServiceProvider(AbortRQServiceProviderReason::ReasonNotSpecified) };
    let _ = assoc.send(&pdu).await;
    Ok(())
}

/// A UID as received, without the NUL or space padding to even length.
fn uid(s: &str) -> String {
    s.trim_end_matches(['\0', ' ']).to_owned()
}
