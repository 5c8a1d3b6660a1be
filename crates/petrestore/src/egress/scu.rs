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
}

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
    Ok(send_files_observed(peer, files, cancel, |_| {}).await?.len())
}

/// [`send_files`], calling `sent_one` with the running count after each
/// acknowledged instance (progress display); returns the instances sent
/// (for a storage commitment request).
pub async fn send_files_observed(
    peer: &Peer,
    files: &[PathBuf],
    cancel: &CancellationToken,
    mut sent_one: impl FnMut(usize),
) -> Result<Vec<SopRef>, SendError> {
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
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60));
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
        let rsp = store_one(&mut assoc, *pcid, message_id, &class, &sop, &data).await.map_err(transfer)?;
        let status = rsp.status.unwrap_or(dimse::status::PROCESSING_FAILURE);
        if !dimse::status::is_ok(status) {
            let _ = assoc.release().await;
            return Err(SendError::Refused { ae: peer.called_ae.clone(), sop, status, comment: rsp.error_comment });
        }
        sent.push(SopRef { class, instance: sop });
        sent_one(sent.len());
    }
    let _ = assoc.release().await;
    Ok(sent)
}

type Assoc = dicom_ul::association::client::AsyncClientAssociation<tokio::net::TcpStream>;

/// One C-STORE on an open association: command, data set, response.
async fn store_one(assoc: &mut Assoc, pcid: u8, message_id: u16, class: &str, sop: &str, data: &[u8]) -> Result<Command, String> {
    exchange(assoc, pcid, dimse::store_request(message_id, class, sop), data).await
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
    let rsp = exchange(&mut assoc, pcid, dimse::commitment_request(1), &data).await.map_err(transfer)?;
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
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60))
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

/// A command with a data set on an open association, and its response.
async fn exchange(assoc: &mut Assoc, pcid: u8, cmd: Vec<u8>, data: &[u8]) -> Result<Command, String> {
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
    let rsp = store_one(&mut assoc, pcid, 1, sop_class, sop_instance, dataset)
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
