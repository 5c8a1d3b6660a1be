//! Fuzzing (proptest) of what a hostile or broken sender controls: the
//! instance checks, volume assembly, and the DICOM upper layer of the real
//! SCP. Each property runs `PROPTEST_CASES` cases (64 in CI; e.g.
//! `PROPTEST_CASES=20000 cargo test --release --test fuzz` for a long run).
//! The seeds are instances the simulator makes (valid by construction);
//! failing inputs proptest finds are kept in `tests/fuzz.proptest-regressions`
//! and replayed first on every run, and hostile inputs worth keeping are
//! committed in `tests/fuzz-corpus/` and replayed by
//! `the_committed_corpus_is_refused`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use petrestore::dicom::dimse::Command;
use petrestore::dicom::{self, part10};
use petrestore::ingest::store::{FolderSink, check_instance};
use petrestore::ingest::{self, ScpConfig};
use proptest::prelude::*;
use proptest::sample::Index;
use testkit::associate_rq;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

/// One byte-level change.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    /// Overwrite 4 bytes with an extreme length (0, odd, huge).
    Length(Index, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), prop_oneof![Just(0u32), Just(1), Just(0xFFFF_FFFF), Just(0x7FFF_FFFF), any::<u32>()])
            .prop_map(|(i, v)| Mutation::Length(i, v)),
    ]
}

fn apply(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        if b.is_empty() {
            break;
        }
        match m {
            Mutation::Flip(i, x) => {
                let k = i.index(b.len());
                b[k] ^= x;
            }
            Mutation::Truncate(i) => b.truncate(i.index(b.len())),
            Mutation::Insert(i, bytes) => {
                let k = i.index(b.len());
                b.splice(k..k, bytes.iter().copied());
            }
            Mutation::Length(i, v) => {
                let k = i.index(b.len().saturating_sub(4).max(1));
                for (j, byte) in v.to_le_bytes().iter().enumerate() {
                    if let Some(x) = b.get_mut(k + j) {
                        *x = *byte;
                    }
                }
            }
        }
    }
    b
}

/// A valid PET instance from the simulator: its data set bytes (Explicit VR
/// Little Endian) and the C-STORE command that would carry it.
fn seed_instance() -> (Vec<u8>, Command) {
    static SEED: std::sync::OnceLock<(Vec<u8>, Command)> = std::sync::OnceLock::new();
    SEED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let s = testkit::series(dir.path(), 2, 16, 5);
        let obj = part10::open(&s.files[0]).unwrap();
        let bytes = part10::dataset_bytes(&obj, dicom::EXPLICIT_VR_LE).unwrap();
        let cmd = Command::parse(&dicom::dimse::store_request(
            1,
            obj.meta().media_storage_sop_class_uid().trim_end_matches('\0'),
            obj.meta().media_storage_sop_instance_uid().trim_end_matches('\0'),
        ))
        .unwrap();
        (bytes, cmd)
    })
    .clone()
}

#[test]
fn the_seed_instance_passes_the_checks() {
    let (bytes, cmd) = seed_instance();
    check_instance(dicom::EXPLICIT_VR_LE, &cmd, &bytes).unwrap_or_else(|e| panic!("the valid seed is refused: {e}"));
}

/// The committed corpus (`tests/fuzz-corpus/`, what it holds in its
/// README): every file is refused by the instance checks with a reason.
#[test]
fn the_committed_corpus_is_refused() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    let (_, cmd) = seed_instance();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|x| x != "bin") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let ts = if name.ends_with("-implicit.bin") { dicom::IMPLICIT_VR_LE } else { dicom::EXPLICIT_VR_LE };
        match check_instance(ts, &cmd, &bytes) {
            // refused by the length guard, before the parser allocates
            Err(e) => assert!(e.to_string().contains("declares") || e.to_string().contains("delimiter"), "{name}: {e}"),
            Ok(_) => panic!("{name} was accepted"),
        }
        n += 1;
    }
    assert!(n >= 5, "the corpus holds {n} files in {}", dir.display());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Mutated instances: refused with a reason or accepted, never a panic;
    /// what is accepted keeps the promises the checks make.
    #[test]
    fn instance_checks_never_panic(ms in prop::collection::vec(mutation(), 1..6), implicit in any::<bool>()) {
        let (bytes, cmd) = seed_instance();
        let damaged = apply(bytes, &ms);
        let ts = if implicit { dicom::IMPLICIT_VR_LE } else { dicom::EXPLICIT_VR_LE };
        match check_instance(ts, &cmd, &damaged) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(c) => {
                prop_assert!(dicom::uid::valid_uid(&c.sop) && dicom::uid::valid_uid(&c.series) && dicom::uid::valid_uid(&c.study));
                prop_assert_eq!(c.sop.as_str(), cmd.affected_sop_instance.trim_end_matches('\0'));
            }
        }
    }

    /// Arbitrary bytes as a data set.
    #[test]
    fn instance_checks_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let (_, cmd) = seed_instance();
        prop_assert!(check_instance(dicom::EXPLICIT_VR_LE, &cmd, &bytes).is_err());
    }

    /// Series whose files are damaged: volume assembly says what is wrong
    /// or builds a consistent volume, never panics.
    #[test]
    fn volume_assembly_never_panics(which in any::<Index>(), ms in prop::collection::vec(mutation(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let s = testkit::series(dir.path(), 3, 8, 9);
        let victim = which.get(&s.files).clone();
        let bytes = std::fs::read(&victim).unwrap();
        // keep the 132-byte preamble and magic so the damage hits the content
        let (head, body) = bytes.split_at(132);
        let mut out = head.to_vec();
        out.extend(apply(body.to_vec(), &ms));
        std::fs::write(&victim, out).unwrap();
        let files: Vec<PathBuf> = s.files.clone();
        if let Ok(l) = petrestore::restore::volume::load(&files) {
            let v = &l.volume;
            prop_assert_eq!(v.data.len(), v.nz * v.ny * v.nx);
            prop_assert!(v.nz >= 1 && v.nz <= 3);
        }
    }
}

/// A P-DATA-TF carrying a C-ECHO-RQ on presentation context 1.
fn echo_pdata() -> Vec<u8> {
    let cmd = dicom::dimse::echo_request(1);
    let mut pdv = vec![];
    pdv.extend(((cmd.len() + 2) as u32).to_be_bytes());
    pdv.extend([1, 0x03]);
    pdv.extend(cmd);
    let mut pdu = vec![0x04, 0];
    pdu.extend((pdv.len() as u32).to_be_bytes());
    pdu.extend(pdv);
    pdu
}

struct Scp {
    rt: tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    _dir: tempfile::TempDir,
}

fn scp() -> &'static Scp {
    static SCP: std::sync::OnceLock<Scp> = std::sync::OnceLock::new();
    SCP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let addr = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let cfg = ScpConfig {
                ae_title: "PETRESTORE".into(),
                allowed_callers: None,
                abstract_syntaxes: vec![dicom::VERIFICATION.into(), dicom::PET_IMAGE_STORAGE.into()],
                max_associations: 4,
                max_associations_per_peer: 4,
                artim_timeout: Duration::from_millis(300),
                max_pdu_length: 16384,
                max_buffered_bytes: 1 << 24,
                idle_timeout: Duration::from_secs(2),
                draining: Default::default(),
                close: stop.clone(),
                live: None,
                shared: Default::default(),
            };
            let sink = Arc::new(FolderSink { dir: dir.path().to_owned() });
            tokio::spawn(ingest::serve(l, Arc::new(cfg), sink, stop.clone(), tokio_util::task::TaskTracker::new()));
            addr
        });
        Scp { rt, addr, stop, _dir: dir }
    })
}

/// Send `bytes` (after `prefix`, e.g. a valid request), half-close, and
/// read until the SCP closes; then a well-formed C-ECHO must still work.
fn exchange(prefix: &[u8], bytes: &[u8]) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = scp();
    s.rt.block_on(async {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.map_err(|e| e.to_string())?;
        let _ = c.write_all(prefix).await;
        let _ = c.write_all(bytes).await;
        let _ = c.shutdown().await;
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut sink))
            .await
            .map_err(|_| "the SCP kept a hostile connection open for 10 s".to_string())?
            .ok();
        let peer = petrestore::egress::scu::Peer {
            address: s.addr.to_string(),
            called_ae: "PETRESTORE".into(),
            calling_ae: "CONSOLE".into(),
            timeout: petrestore::egress::scu::DEFAULT_TIMEOUT,
        };
        petrestore::egress::scu::echo(&peer).await.map_err(|e| format!("the SCP stopped answering: {e}"))
    })
}

#[test]
fn the_pdu_seeds_are_answered() {
    exchange(&[], &associate_rq()).unwrap();
    exchange(&associate_rq(), &echo_pdata()).unwrap();
    assert!(!scp().stop.is_cancelled());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Damaged association requests.
    #[test]
    fn damaged_association_requests_are_refused_and_the_scp_goes_on(ms in prop::collection::vec(mutation(), 1..6)) {
        let r = exchange(&[], &apply(associate_rq(), &ms));
        prop_assert!(r.is_ok(), "{:?}", r);
    }

    /// Damaged P-DATA (a C-ECHO command) on an established association.
    #[test]
    fn damaged_pdata_is_refused_and_the_scp_goes_on(ms in prop::collection::vec(mutation(), 1..6)) {
        let r = exchange(&associate_rq(), &apply(echo_pdata(), &ms));
        prop_assert!(r.is_ok(), "{:?}", r);
    }

    /// Any bytes at all.
    #[test]
    fn any_bytes_are_refused_and_the_scp_goes_on(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let r = exchange(&[], &bytes);
        prop_assert!(r.is_ok(), "{:?}", r);
    }
}
