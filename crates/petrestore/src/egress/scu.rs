//! C-STORE SCU: send a set of Part 10 files to one destination over one
//! association. Used by egress, by `demo` to play the console, and by the
//! benchmark.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dicom_ul::Pdu;
use dicom_ul::association::client::ClientAssociationOptions;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::dicom::commitment::{self, SopRef};
use crate::dicom::dimse::{self, Command};
use crate::dicom::{self as d, part10};

/// Where and as whom to send.
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: String,
    pub called_ae: String,
    pub calling_ae: String,
    /// Longest wait for the peer to answer or to take bytes; an instance's
    /// exchange (data set out, response back) may take this plus one second
    /// per MiB of its data set ([`exchange_limit`]).
    pub timeout: Duration,
}

/// [`Peer::timeout`] where nothing else is configured (`egress.timeout_s`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a command with `bytes` of data set may take to be sent and
/// answered: a peer that stops reading (its disk or process stalled while
/// its kernel keeps the connection open) must not hold a delivery forever.
pub fn exchange_limit(timeout: Duration, bytes: usize) -> Duration {
    timeout + Duration::from_secs((bytes as u64).div_ceil(1 << 20))
}

/// Largest command set accepted from a peer (a C-STORE-RSP is ~200 bytes).
const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// Why a transfer stopped.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot open {path}: {reason}")]
    File { path: String, reason: String },
    #[error("association with {ae}@{address} failed: {reason}")]
    Associate { ae: String, address: String, reason: String },
    #[error("{ae} accepted no presentation context for SOP class {sop_class}")]
    NoContext { ae: String, sop_class: String },
    #[error("{ae} answered status 0x{status:04X} for {sop}{}", comment.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Refused { ae: String, sop: String, status: u16, comment: Option<String> },
    #[error("transfer to {ae} broke: {reason}")]
    Transfer { ae: String, reason: String },
    #[error("stopped by shutdown")]
    Cancelled,
}

/// Send `files` to `peer`; returns the number sent. Stops at the first
/// refusal (the caller retries the whole set: derived UIDs are stable, so a
/// resend never creates duplicates with different UIDs).
pub async fn send_files(peer: &Peer, files: &[PathBuf], cancel: &CancellationToken) -> Result<usize, SendError> {
    Ok(send_files_observed(peer, files, cancel, |_| {}).await?.refs.len())
}

/// What a whole set's transfer achieved.
#[derive(Debug, Default)]
pub struct Transfer {
    /// The instances sent and acknowledged, in order.
    pub refs: Vec<SopRef>,
    /// Acknowledgements with a warning status (0xB000 coercion, 0xB006
    /// elements discarded, 0xB007 data set mismatch, 0x0001): counted as
    /// stored (PS3.4), said in the job's history. "0xB006 on 1.2.3…:
    /// comment", one per instance, at most [`MAX_WARNINGS`] kept.
    pub warnings: Vec<String>,
    /// Warnings beyond those kept.
    pub more_warnings: usize,
}

/// Warnings kept per transfer.
pub const MAX_WARNINGS: usize = 3;

/// [`send_files`], calling `sent_one` with the running count after each
/// acknowledged instance (progress display); returns the instances sent
/// (for a storage commitment request).
pub async fn send_files_observed(
    peer: &Peer,
    files: &[PathBuf],
    cancel: &CancellationToken,
    mut sent_one: impl FnMut(usize),
) -> Result<Transfer, SendError> {
    // The SOP classes first (meta groups only), to propose the right
    // contexts; the data sets are read one at a time while sending, so a
    // series is never held in memory whole.
    let mut refs = Vec::with_capacity(files.len());
    let mut classes: BTreeMap<String, ()> = BTreeMap::new();
    for f in files {
        let (class, sop) = part10::sop_of(f).map_err(|reason| SendError::File { path: f.display().to_string(), reason })?;
        classes.insert(class.clone(), ());
        refs.push((class, sop));
    }
    let mut opts = ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae.clone())
        .called_ae_title(peer.called_ae.clone())
        .max_pdu_length(65536)
        .connection_timeout(Duration::from_secs(10))
        .read_timeout(peer.timeout)
        .write_timeout(peer.timeout);
    for c in classes.keys() {
        opts = opts.with_presentation_context(c.clone(), vec![d::EXPLICIT_VR_LE.to_string(), d::IMPLICIT_VR_LE.to_string()]);
    }
    let assoc_err = |reason: String| SendError::Associate { ae: peer.called_ae.clone(), address: peer.address.clone(), reason };
    let mut assoc = opts.establish_async(peer.address.as_str()).await.map_err(|e| assoc_err(e.to_string()))?;
    let _ = assoc.inner_stream().set_nodelay(true);
    let contexts: Vec<(u8, String, String)> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| (pc.id, pc.abstract_syntax.clone(), pc.transfer_syntax.clone()))
        .collect();
    let transfer = |reason: String| SendError::Transfer { ae: peer.called_ae.clone(), reason };

    let mut sent = Vec::with_capacity(refs.len());
    let (mut warnings, mut more_warnings) = (Vec::new(), 0usize);
    for (i, (f, (class, sop))) in files.iter().zip(refs).enumerate() {
        if cancel.is_cancelled() {
            let _ = assoc.abort().await;
            return Err(SendError::Cancelled);
        }
        // Contexts echo the proposed abstract syntax; match by our proposal order.
        let Some((pcid, _, ts)) = contexts.iter().find(|(_, a, _)| a.trim_end_matches('\0') == class) else {
            let _ = assoc.abort().await;
            return Err(SendError::NoContext { ae: peer.called_ae.clone(), sop_class: class });
        };
        // Read and encode on the blocking pool, not on the async worker.
        let (path, syntax) = (f.clone(), ts.clone());
        let read = tokio::task::spawn_blocking(move || part10::open(&path).and_then(|obj| part10::dataset_bytes(&obj, &syntax)))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let data = match read {
            Ok(d) => d,
            Err(reason) => {
                let _ = assoc.abort().await;
                return Err(SendError::File { path: f.display().to_string(), reason });
            }
        };
        let message_id = (i % 65535 + 1) as u16;
        // A shutdown does not wait for a slow peer to take a large instance.
        let rsp = tokio::select! {
            r = store_one(&mut assoc, *pcid, message_id, &class, &sop, &data, peer.timeout) => Some(r),
            _ = cancel.cancelled() => None,
        };
        let Some(rsp) = rsp else {
            abort_soon(assoc).await;
            return Err(SendError::Cancelled);
        };
        let rsp = match rsp {
            Ok(r) => r,
            Err(reason) => {
                abort_soon(assoc).await;
                return Err(transfer(reason));
            }
        };
        let status = rsp.status.unwrap_or(dimse::status::PROCESSING_FAILURE);
        if !dimse::status::is_ok(status) {
            let _ = assoc.release().await;
            return Err(SendError::Refused { ae: peer.called_ae.clone(), sop, status, comment: rsp.error_comment });
        }
        if status != dimse::status::SUCCESS {
            let comment = rsp.error_comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default();
            tracing::warn!(ae = %peer.called_ae, sop = %sop, status = format!("0x{status:04X}"), "stored with a warning{comment}");
            if warnings.len() < MAX_WARNINGS {
                warnings.push(format!("0x{status:04X} on {sop}{comment}"));
            } else {
                more_warnings += 1;
            }
        }
        sent.push(SopRef { class, instance: sop });
        sent_one(sent.len());
    }
    let _ = assoc.release().await;
    Ok(Transfer { refs: sent, warnings, more_warnings })
}

type Assoc = dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream>;

/// A-ABORT, unless the peer does not take even that within a moment: the
/// association is dropped (its socket closed) either way.
async fn abort_soon(assoc: Assoc) {
    let _ = tokio::time::timeout(Duration::from_secs(2), assoc.abort()).await;
}

/// One C-STORE on an open association: command, data set, response, which
/// must answer this request (C-STORE-RSP to its Message ID, for its SOP
/// Instance when the peer names one).
async fn store_one(
    assoc: &mut Assoc,
    pcid: u8,
    message_id: u16,
    class: &str,
    sop: &str,
    data: &[u8],
    timeout: Duration,
) -> Result<Command, String> {
    let rsp = exchange(assoc, pcid, dimse::store_request(message_id, class, sop), data, timeout).await?;
    if rsp.command_field != dimse::C_STORE_RSP {
        return Err(format!("answered a C-STORE with command 0x{:04X}, not a C-STORE-RSP", rsp.command_field));
    }
    if rsp.message_id != message_id {
        return Err(format!("answered message {} while message {message_id} was waiting", rsp.message_id));
    }
    let answered = rsp.affected_sop_instance.trim_end_matches('\0');
    if !answered.is_empty() && answered != sop {
        return Err(format!("answered for instance {answered} while {sop} was sent"));
    }
    Ok(rsp)
}

/// Ask `peer` to take responsibility for `refs` (Storage Commitment Push
/// Model: N-ACTION on its own association). `Ok` means the archive took
/// the request; its answer comes later, as an N-EVENT-REPORT to our SCP.
pub async fn request_commitment(peer: &Peer, transaction_uid: &str, refs: &[SopRef]) -> Result<(), SendError> {
    let (mut assoc, pcid, ts) = associate_one(peer, commitment::PUSH_MODEL, &[d::EXPLICIT_VR_LE, d::IMPLICIT_VR_LE]).await?;
    let transfer = |reason: String| SendError::Transfer { ae: peer.called_ae.clone(), reason };
    let syntax = d::transfer_syntax(ts.trim_end_matches('\0')).ok_or_else(|| transfer(format!("transfer syntax {ts} not supported")))?;
    let mut data = Vec::new();
    commitment::request_dataset(transaction_uid, refs).write_dataset_with_ts(&mut data, syntax).map_err(|e| transfer(e.to_string()))?;
    let rsp = exchange(&mut assoc, pcid, dimse::commitment_request(1), &data, peer.timeout).await.map_err(transfer)?;
    let _ = assoc.release().await;
    let status = rsp.status.unwrap_or(dimse::status::PROCESSING_FAILURE);
    if !dimse::status::is_ok(status) {
        return Err(SendError::Refused {
            ae: peer.called_ae.clone(),
            sop: "storage commitment".into(),
            status,
            comment: rsp.error_comment,
        });
    }
    Ok(())
}

/// An association proposing one SOP class in `syntaxes`: the association,
/// the accepted context's id and its transfer syntax; aborted with
/// `NoContext` when the peer accepts none.
async fn associate_one(peer: &Peer, sop_class: &str, syntaxes: &[&str]) -> Result<(Assoc, u8, String), SendError> {
    let assoc = ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae.clone())
        .called_ae_title(peer.called_ae.clone())
        .with_presentation_context(sop_class.to_string(), syntaxes.iter().map(|t| t.to_string()).collect())
        .max_pdu_length(65536)
        .connection_timeout(Duration::from_secs(10))
        .read_timeout(peer.timeout)
        .write_timeout(peer.timeout)
        .establish_async(peer.address.as_str())
        .await
        .map_err(|e| SendError::Associate { ae: peer.called_ae.clone(), address: peer.address.clone(), reason: e.to_string() })?;
    let Some(pc) = assoc.presentation_contexts().iter().find(|pc| pc.reason == PresentationContextResultReason::Acceptance) else {
        let _ = assoc.abort().await;
        return Err(SendError::NoContext { ae: peer.called_ae.clone(), sop_class: sop_class.to_string() });
    };
    let (pcid, ts) = (pc.id, pc.transfer_syntax.clone());
    Ok((assoc, pcid, ts))
}

/// A command with a data set on an open association, and its response,
/// within [`exchange_limit`]: the data set's writer has no timeout of its own.
async fn exchange(assoc: &mut Assoc, pcid: u8, cmd: Vec<u8>, data: &[u8], timeout: Duration) -> Result<Command, String> {
    let limit = exchange_limit(timeout, data.len());
    match tokio::time::timeout(limit, exchange_inner(assoc, pcid, cmd, data)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the peer did not take and answer {} bytes within {} s (it stopped reading or answering)",
            data.len(),
            limit.as_secs()
        )),
    }
}

async fn exchange_inner(assoc: &mut Assoc, pcid: u8, cmd: Vec<u8>, data: &[u8]) -> Result<Command, String> {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue { presentation_context_id: pcid, value_type: PDataValueType::Command, is_last: true, data: cmd }],
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut w = assoc.send_pdata(pcid);
    w.write_all(data).await.map_err(|e| e.to_string())?;
    w.finish().await.map_err(|e| e.to_string())?;
    receive_command(assoc).await
}

/// Send one data set exactly as given (already encoded in `ts`) under the
/// given command UIDs, and return the peer's status and error comment. For
/// probing a peer with hostile input (tests) and for diagnostics.
pub async fn send_raw(
    peer: &Peer,
    sop_class: &str,
    sop_instance: &str,
    ts: &str,
    dataset: &[u8],
) -> Result<(u16, Option<String>), SendError> {
    let (mut assoc, pcid, _) = associate_one(peer, sop_class, &[ts]).await?;
    let rsp = store_one(&mut assoc, pcid, 1, sop_class, sop_instance, dataset, peer.timeout)
        .await
        .map_err(|reason| SendError::Transfer { ae: peer.called_ae.clone(), reason })?;
    let _ = assoc.release().await;
    Ok((rsp.status.unwrap_or(dimse::status::PROCESSING_FAILURE), rsp.error_comment))
}

async fn receive_command(assoc: &mut Assoc) -> Result<Command, String> {
    let mut buf = Vec::new();
    loop {
        match assoc.receive().await.map_err(|e| e.to_string())? {
            Pdu::PData { data } => {
                for v in data {
                    if v.value_type == PDataValueType::Command {
                        if buf.len() + v.data.len() > MAX_COMMAND_BYTES {
                            return Err(format!("the peer's command set exceeds {MAX_COMMAND_BYTES} bytes"));
                        }
                        buf.extend_from_slice(&v.data);
                        if v.is_last {
                            return Command::parse(&buf).map_err(|e| e.to_string());
                        }
                    }
                }
            }
            Pdu::AbortRQ { source } => return Err(format!("peer aborted ({source:?})")),
            other => return Err(format!("unexpected PDU {other:?}")),
        }
    }
}

/// C-ECHO a peer (used by `demo` to wait for readiness and by diagnostics).
pub async fn echo(peer: &Peer) -> Result<(), SendError> {
    let failed = |reason: String| SendError::Associate { ae: peer.called_ae.clone(), address: peer.address.clone(), reason };
    echo_inner(peer).await.map_err(failed)
}

async fn echo_inner(peer: &Peer) -> Result<(), String> {
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title(peer.calling_ae.clone())
        .called_ae_title(peer.called_ae.clone())
        .with_abstract_syntax(d::VERIFICATION)
        .connection_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(10))
        .establish_async(peer.address.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let pcid = assoc.presentation_contexts().first().ok_or("no presentation context")?.id;
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pcid,
                value_type: PDataValueType::Command,
                is_last: true,
                data: dimse::echo_request(1),
            }],
        })
        .await
        .map_err(|e| e.to_string())?;
    let rsp = receive_command(&mut assoc).await?;
    let _ = assoc.release().await;
    match rsp.status {
        Some(0) => Ok(()),
        s => Err(format!("C-ECHO status {s:?}")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    use dicom_ul::association::server::ServerAssociationOptions;

    /// A destination that accepts the association and then never reads
    /// again (its process stalled, its kernel keeping the connection open).
    async fn stalled_peer() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            stall(socket, d::PET_IMAGE_STORAGE).await;
        });
        (addr, task)
    }

    /// A destination that stores every instance with `status` and a comment.
    async fn answering_peer(status: u16) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            store_all(socket, status).await;
        });
        addr
    }

    /// An archive that stores the series on its first association, then
    /// takes the storage commitment request's association and never
    /// answers it (its process stalled).
    pub(crate) async fn archive_that_stalls_on_commitment() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            store_all(socket, 0).await;
            let (socket, _) = listener.accept().await.unwrap();
            stall(socket, commitment::PUSH_MODEL).await;
        });
        addr
    }

    /// Accept an association for `sop_class` and hold it open, reading nothing.
    async fn stall(socket: tokio::net::TcpStream, sop_class: &str) {
        let assoc = ServerAssociationOptions::new()
            .accept_any()
            .with_abstract_syntax(sop_class)
            .with_transfer_syntax(d::EXPLICIT_VR_LE)
            .establish_async(socket)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(assoc);
    }

    /// Answer every C-STORE on one association with `status`, until release.
    async fn store_all(socket: tokio::net::TcpStream, status: u16) {
        let mut assoc = ServerAssociationOptions::new()
            .accept_any()
            .with_abstract_syntax(d::PET_IMAGE_STORAGE)
            .with_transfer_syntax(d::EXPLICIT_VR_LE)
            .establish_async(socket)
            .await
            .unwrap();
        let mut rq: Option<(u8, Command)> = None;
        loop {
            match assoc.receive().await.unwrap() {
                Pdu::PData { data } => {
                    for v in data {
                        match v.value_type {
                            PDataValueType::Command => rq = Some((v.presentation_context_id, Command::parse(&v.data).unwrap())),
                            PDataValueType::Data if v.is_last => {
                                let (pcid, cmd) = rq.take().unwrap();
                                let data = dimse::response(&cmd, status, Some("Units coerced"));
                                let pdv =
                                    PDataValue { presentation_context_id: pcid, value_type: PDataValueType::Command, is_last: true, data };
                                assoc.send(&Pdu::PData { data: vec![pdv] }).await.unwrap();
                            }
                            PDataValueType::Data => {}
                        }
                    }
                }
                Pdu::ReleaseRQ => {
                    let _ = assoc.send(&Pdu::ReleaseRP).await;
                    return;
                }
                _ => return,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_stored_with_a_warning_count_as_sent_and_are_said() {
        let tmp = tempfile::tempdir().unwrap();
        let file = big_instance(tmp.path(), 64);
        let addr = answering_peer(0xB000).await;
        let peer = Peer { address: addr.to_string(), called_ae: "ANY".into(), calling_ae: "PETRESTORE".into(), timeout: DEFAULT_TIMEOUT };
        let t = send_files_observed(&peer, &[file], &CancellationToken::new(), |_| {}).await.unwrap();
        assert_eq!(t.refs.len(), 1);
        assert_eq!(t.warnings, ["0xB000 on 1.2.826.0.1.3680043.10.543.99.1: Units coerced"]);
        assert_eq!(t.more_warnings, 0);
        // a failure status is not a warning
        let file = big_instance(tmp.path(), 64);
        let addr = answering_peer(0xA700).await;
        let peer = Peer { address: addr.to_string(), called_ae: "ANY".into(), calling_ae: "PETRESTORE".into(), timeout: DEFAULT_TIMEOUT };
        let e = send_files_observed(&peer, &[file], &CancellationToken::new(), |_| {}).await.unwrap_err();
        assert!(matches!(e, SendError::Refused { status: 0xA700, .. }), "{e}");
    }

    /// One PET instance of `bytes` pixel data bytes as a Part 10 file.
    pub(crate) fn big_instance(dir: &std::path::Path, bytes: usize) -> PathBuf {
        let sop = "1.2.826.0.1.3680043.10.543.99.1";
        let mut obj = InMemDicomObject::new_empty();
        obj.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from(d::PET_IMAGE_STORAGE)));
        obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)));
        obj.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U8(vec![7u8; bytes].into())));
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .media_storage_sop_class_uid(d::PET_IMAGE_STORAGE)
                    .media_storage_sop_instance_uid(sop)
                    .transfer_syntax(d::EXPLICIT_VR_LE),
            )
            .unwrap();
        let path = dir.join("big.dcm");
        file.write_to_file(&path).unwrap();
        path
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_destination_that_stops_reading_fails_the_attempt_instead_of_hanging() {
        let tmp = tempfile::tempdir().unwrap();
        // more than the loopback socket buffers of both ends can hold
        let file = big_instance(tmp.path(), 32 << 20);
        let (addr, _peer) = stalled_peer().await;
        let peer =
            Peer { address: addr.to_string(), called_ae: "ANY".into(), calling_ae: "PETRESTORE".into(), timeout: Duration::from_secs(1) };
        let cancel = CancellationToken::new();
        // (the outer limit only keeps a regression from hanging the suite)
        let r = tokio::time::timeout(Duration::from_secs(600), send_files(&peer, &[file], &cancel))
            .await
            .expect("the transfer to a stalled destination never ended");
        let e = r.expect_err("a stalled destination cannot have taken the instance");
        assert!(matches!(e, SendError::Transfer { .. }) && e.to_string().contains("stopped reading or answering"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_ends_a_transfer_to_a_stalled_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let file = big_instance(tmp.path(), 32 << 20);
        let (addr, _peer) = stalled_peer().await;
        let peer = Peer { address: addr.to_string(), called_ae: "ANY".into(), calling_ae: "PETRESTORE".into(), timeout: DEFAULT_TIMEOUT };
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            // (by then the data set fills both ends' socket buffers)
            tokio::time::sleep(Duration::from_secs(3)).await;
            c.cancel();
        });
        let r = tokio::time::timeout(Duration::from_secs(600), send_files(&peer, &[file], &cancel))
            .await
            .expect("a shutdown did not end the transfer");
        assert!(matches!(r, Err(SendError::Cancelled)), "{r:?}");
    }
}
