//! The gate in front of association establishment (PS3.8 association
//! hygiene): what a connection must show before it may hold one of the
//! `dicom.max_associations` slots.
//!
//! - **Per peer**: open connections from one IP address are capped
//!   (`dicom.max_associations_per_peer`), so one host cannot take every slot.
//! - **ARTIM**: the A-ASSOCIATE-RQ must arrive within `dicom.artim_timeout_s`
//!   of the connect, or the connection is closed.
//! - **First PDU**: read without consuming it (`peek`), so the association
//!   library still sees the whole request; a PDU type other than
//!   A-ASSOCIATE-RQ, or a length no request can have, gets A-ABORT at once.
//! - **Slot**: taken only after a whole, well-formed request has arrived; a
//!   request that finds every slot busy waits up to ARTIM for one, then gets
//!   A-ASSOCIATE-RJ (rejected-transient, local-limit-exceeded).
//!
//! - **TLS**: the bytes are encrypted, so the request cannot be read before
//!   the handshake; instead the client's first TLS record (a ClientHello)
//!   must have arrived, whole, within ARTIM before the connection may wait
//!   for a slot. The handshake and the request then finish within ARTIM.
//!
//! So a connection that never associates holds no association slot at all,
//! only one of the (four times as many) connection places.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest A-ASSOCIATE-RQ accepted: a request with every storage class and
/// transfer syntax of the standard stays far below it.
pub const MAX_RQ_LENGTH: u32 = 256 * 1024;

/// Why a connection was turned away before it associated.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no A-ASSOCIATE-RQ within the ARTIM timeout ({0:?}): closed")]
    Artim(Duration),
    #[error("first PDU has type 0x{0:02X}, not A-ASSOCIATE-RQ (0x01): A-ABORT sent")]
    PduType(u8),
    #[error("A-ASSOCIATE-RQ claims {0} bytes (at most {1}, dicom.max_pdu_length or {MAX_RQ_LENGTH}): A-ABORT sent")]
    Length(u32, u32),
    #[error("closed by the peer before a complete A-ASSOCIATE-RQ (or TLS ClientHello)")]
    Closed,
    #[error("every association slot stayed busy for {0:?}: A-ASSOCIATE-RJ (transient, local limit exceeded) sent")]
    Busy(Duration),
    #[error("association rejected: draining; A-ASSOCIATE-RJ (transient) sent")]
    Draining,
    #[error("no TLS ClientHello within the ARTIM timeout ({0:?}): closed")]
    TlsArtim(Duration),
    #[error("first bytes {0:02X?} on the TLS listener are not a TLS ClientHello: closed")]
    NotTls(Vec<u8>),
    #[error("{0}")]
    Io(String),
}

/// Open connections per peer address. A [`PeerSlot`] counts one until dropped.
#[derive(Clone, Default)]
pub struct PeerCounts {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One open connection of a peer; gives its place back when dropped.
pub struct PeerSlot {
    counts: PeerCounts,
    ip: IpAddr,
}

impl PeerCounts {
    /// Count a new connection from `ip`, unless it already has `cap` open.
    pub fn try_open(&self, ip: IpAddr, cap: usize) -> Option<PeerSlot> {
        let mut open = self.open.lock().expect("peer counts");
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(PeerSlot { counts: self.clone(), ip })
    }

    /// Open connections of `ip` (for logs and tests).
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().expect("peer counts").get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().expect("peer counts");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Wait (without consuming anything) until a whole A-ASSOCIATE-RQ is in the
/// socket's receive buffer, within `artim`; returns its calling AE title
/// (trimmed). An invalid first PDU is answered with A-ABORT here.
pub async fn await_request(socket: &mut TcpStream, artim: Duration, max_pdu_length: u32) -> Result<String, Refusal> {
    // the association layer refuses a longer request without a word: it is
    // refused here, with an A-ABORT and the lengths in the log
    let max = max_pdu_length.min(MAX_RQ_LENGTH);
    let checked = tokio::time::timeout(artim, peek_request(socket, max)).await;
    match checked {
        Err(_) => Err(Refusal::Artim(artim)),
        Ok(Err(r @ (Refusal::PduType(_) | Refusal::Length(..)))) => {
            let reason = if matches!(r, Refusal::PduType(_)) { ABORT_UNRECOGNIZED_PDU } else { ABORT_INVALID_PARAMETER };
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.write_all(&a_abort(reason))).await;
            drain(socket).await;
            Err(r)
        }
        Ok(other) => other,
    }
}

async fn peek_request(socket: &TcpStream, max: u32) -> Result<String, Refusal> {
    let rq = peek_whole(socket, 6, |head| {
        if head.len() < 6 {
            return Ok(None);
        }
        if head[0] != 0x01 {
            return Err(Refusal::PduType(head[0]));
        }
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
        if !(68..=max).contains(&len) {
            // 68: the fixed part of the request (PS3.8 9.3.2)
            return Err(Refusal::Length(len, max));
        }
        Ok(Some(6 + len as usize))
    })
    .await?;
    // PS3.8 9.3.2: protocol version (2), reserved (2), called AE title
    // (16), calling AE title (16) after the 6-byte header
    Ok(String::from_utf8_lossy(&rq[26..42]).trim().to_owned())
}

/// Peek (without consuming anything) until a whole record is in the
/// socket's receive buffer; returns it. `length` sees the first bytes (up
/// to `head`, as they arrive) and says the record's whole length once
/// `head` bytes are in (`Ok(None)` before), or refuses it.
async fn peek_whole(socket: &TcpStream, head: usize, length: impl Fn(&[u8]) -> Result<Option<usize>, Refusal>) -> Result<Vec<u8>, Refusal> {
    let mut buf = vec![0u8; head];
    let mut need = None;
    loop {
        let n = socket.peek(&mut buf).await.map_err(|e| Refusal::Io(e.to_string()))?;
        if n == 0 {
            return Err(Refusal::Closed);
        }
        match need {
            None => {
                if let Some(total) = length(&buf[..n.min(head)])? {
                    need = Some(total);
                    buf.resize(total.max(head), 0);
                    continue;
                }
            }
            Some(total) if n >= total => {
                buf.truncate(total);
                return Ok(buf);
            }
            Some(_) => {}
        }
        // part of the record is still on its way: wait for more bytes
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Largest first TLS record waited for: a TLS plaintext record carries at
/// most 2^14 bytes.
const MAX_TLS_RECORD: usize = 16 * 1024;

/// Wait (without consuming anything) until the client's first TLS record
/// is in the socket's receive buffer, whole, and is a handshake record
/// starting a ClientHello, within `artim`. Anything else is closed without
/// a word (a TLS listener has no way to answer plain DICOM).
pub async fn await_client_hello(socket: &TcpStream, artim: Duration) -> Result<(), Refusal> {
    tokio::time::timeout(artim, peek_client_hello(socket)).await.unwrap_or(Err(Refusal::TlsArtim(artim)))
}

async fn peek_client_hello(socket: &TcpStream) -> Result<(), Refusal> {
    peek_whole(socket, 6, |head| {
        // record type 22 (handshake), version 3.x, handshake type 1 (ClientHello)
        if head.first() != Some(&0x16) || head.get(1).is_some_and(|&v| v != 0x03) || head.get(5).is_some_and(|&t| t != 0x01) {
            return Err(Refusal::NotTls(head.to_vec()));
        }
        if head.len() < 6 {
            return Ok(None);
        }
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        if !(4..=MAX_TLS_RECORD).contains(&len) {
            return Err(Refusal::NotTls(head.to_vec()));
        }
        Ok(Some(5 + len))
    })
    .await
    .map(drop)
}

/// Turn away a well-formed request when no slot freed up within ARTIM.
pub async fn reject_busy(socket: &mut TcpStream, waited: Duration) -> Refusal {
    // A-ASSOCIATE-RJ: result 2 (rejected-transient), source 3 (service
    // provider, presentation related), reason 2 (local-limit-exceeded).
    let rj = [0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02];
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.write_all(&rj)).await;
    drain(socket).await;
    Refusal::Busy(waited)
}

/// Refuse an association while the node drains: transient (result 2),
/// service user (source 1), no reason given (reason 1), so the sender
/// tries again later instead of giving the series up.
pub async fn reject_draining(socket: &mut TcpStream) -> Refusal {
    let rj = [0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x01, 0x01];
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.write_all(&rj)).await;
    drain(socket).await;
    Refusal::Draining
}

/// Half-close and read away what the peer sent (briefly): closing with
/// unread bytes makes the kernel send a reset, and the peer could lose the
/// A-ABORT or A-ASSOCIATE-RJ just written.
async fn drain(socket: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let _ = socket.shutdown().await;
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while let Ok(n) = socket.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

const ABORT_UNRECOGNIZED_PDU: u8 = 0x01;
const ABORT_INVALID_PARAMETER: u8 = 0x06;

/// A-ABORT from the service provider (source 2) with `reason`.
fn a_abort(reason: u8) -> [u8; 10] {
    [0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, reason]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_counts_cap_each_address_and_give_places_back() {
        let c = PeerCounts::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let a = c.try_open(ip, 2).unwrap();
        let _b = c.try_open(ip, 2).unwrap();
        assert!(c.try_open(ip, 2).is_none(), "third connection of one host");
        assert!(c.try_open(other, 2).is_some(), "another host is not affected");
        drop(a);
        assert_eq!(c.open(ip), 1);
        assert!(c.try_open(ip, 2).is_some());
    }

    #[tokio::test]
    async fn the_first_pdu_is_checked_without_consuming_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cases: Vec<(Vec<u8>, Option<Refusal>)> = vec![
            (vec![0x55; 100], Some(Refusal::PduType(0x55))),
            ([vec![0x01, 0, 0xFF, 0xFF, 0xFF, 0xFF], vec![0; 10]].concat(), Some(Refusal::Length(u32::MAX, 65536))),
            // longer than the PDU length we announce (65536 here), though under the gate's own bound
            ([vec![0x01, 0, 0, 0x01, 0x00, 0x01], vec![0; 10]].concat(), Some(Refusal::Length(65537, 65536))),
            // a whole request of 68 bytes (the fixed part: version, called
            // and calling AE titles, reserved), in two writes
            ([vec![0x01, 0, 0, 0, 0, 68, 0, 1, 0, 0], b"ME              ARCHIVE         ".to_vec(), vec![0; 32]].concat(), None),
        ];
        for (bytes, want) in cases {
            let client = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&bytes[..8]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
                // the gate may have decided (and closed) on the first bytes
                let _ = s.write_all(&bytes[8..]).await;
                let mut back = Vec::new();
                let _ = tokio::time::timeout(Duration::from_millis(300), tokio::io::AsyncReadExt::read_to_end(&mut s, &mut back)).await;
                back
            });
            let (mut socket, _) = listener.accept().await.unwrap();
            let got = await_request(&mut socket, Duration::from_secs(2), 65536).await;
            match &want {
                None => {
                    assert_eq!(got, Ok("ARCHIVE".to_string()), "the calling AE title");
                    let mut first = [0u8; 1];
                    socket.peek(&mut first).await.unwrap();
                    assert_eq!(first[0], 0x01, "nothing consumed");
                }
                Some(w) => assert_eq!(got.as_ref(), Err(w)),
            }
            drop(socket);
            let back = client.await.unwrap();
            if want.is_some() {
                assert_eq!(back.first(), Some(&0x07), "A-ABORT sent: {back:?}");
            }
        }
        // silence: the ARTIM timer closes it
        let _idle = TcpStream::connect(addr).await.unwrap();
        let (mut socket, _) = listener.accept().await.unwrap();
        assert_eq!(await_request(&mut socket, Duration::from_millis(200), 65536).await, Err(Refusal::Artim(Duration::from_millis(200))));
    }
}
