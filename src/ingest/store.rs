//! C-STORE handling: validate a received data set, spool it durably, record
//! it in the journal, flush, and only then answer success. This file is the
//! one place that maps storage errors to DIMSE statuses.

use std::path::PathBuf;
use std::sync::Arc;

use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use tokio::sync::Notify;

use super::{StoreContext, StoreSink, StoreStatus};
use crate::dicom::attrs::Attrs;
use crate::dicom::dimse::{Command, status};
use crate::dicom::uid::valid_uid;
use crate::dicom::{PET_STORAGE_CLASSES, part10};
use crate::journal::{Arrival, InstanceRecord, JobKind, Journal, JournalError, Recorded};
use crate::spool::{self, Spool, Written};

/// Why an instance was not stored. The doc of each variant is what the
/// sender reads in Error Comment.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot parse data set: {0}")]
    Unparseable(String),
    #[error("{0} missing")]
    Missing(&'static str),
    #[error("invalid {what} {value:?}")]
    BadUid { what: &'static str, value: String },
    #[error("data set {what} {found} differs from the command's {expected}")]
    Mismatch { what: &'static str, found: String, expected: String },
    #[error("pixel data has {found} bytes, expected {expected}")]
    PixelLength { found: usize, expected: usize },
    #[error("disk nearly full: {free_mb} MiB free")]
    LowDisk { free_mb: u64 },
    #[error("spool write failed: {0}")]
    Disk(std::io::Error),
    #[error("journal failed: {0}")]
    Journal(#[from] JournalError),
}

impl StoreError {
    /// The DIMSE status for this error.
    pub fn status(&self) -> u16 {
        match self {
            StoreError::Unparseable(_)
            | StoreError::Missing(_)
            | StoreError::BadUid { .. }
            | StoreError::PixelLength { .. } => status::CANNOT_UNDERSTAND,
            StoreError::Mismatch { .. } => status::DATASET_MISMATCH,
            StoreError::LowDisk { .. } | StoreError::Disk(_) | StoreError::Journal(_) => status::OUT_OF_RESOURCES,
        }
    }
}

/// The daemon's sink: spool + journal, then wake the scheduler.
pub struct SpoolSink {
    pub spool: Spool,
    pub journal: Journal,
    pub min_free_bytes: u64,
    /// Woken when a series completes (the journal stays the truth).
    pub wake: Arc<Notify>,
}

impl SpoolSink {
    fn try_store(&self, ctx: &StoreContext, cmd: &Command, dataset: Vec<u8>) -> Result<Recorded, StoreError> {
        let ts = crate::dicom::transfer_syntax(&ctx.transfer_syntax)
            .ok_or_else(|| StoreError::Unparseable(format!("transfer syntax {}", ctx.transfer_syntax)))?;
        let obj = InMemDicomObject::read_dataset_with_ts(&dataset[..], ts)
            .map_err(|e| StoreError::Unparseable(e.to_string()))?;

        let sop_class = obj.str_of(tags::SOP_CLASS_UID).ok_or(StoreError::Missing("SOP Class UID"))?;
        let sop = obj.str_of(tags::SOP_INSTANCE_UID).ok_or(StoreError::Missing("SOP Instance UID"))?;
        let study = obj.str_of(tags::STUDY_INSTANCE_UID).ok_or(StoreError::Missing("Study Instance UID"))?;
        let series = obj.str_of(tags::SERIES_INSTANCE_UID).ok_or(StoreError::Missing("Series Instance UID"))?;
        for (what, v) in [("SOP Instance UID", &sop), ("Study Instance UID", &study), ("Series Instance UID", &series)] {
            if !valid_uid(v) {
                return Err(StoreError::BadUid { what, value: v.clone() });
            }
        }
        if sop_class != cmd.affected_sop_class.trim_end_matches('\0') {
            return Err(StoreError::Mismatch { what: "SOP Class UID", found: sop_class, expected: cmd.affected_sop_class.clone() });
        }
        if sop != cmd.affected_sop_instance.trim_end_matches('\0') {
            return Err(StoreError::Mismatch { what: "SOP Instance UID", found: sop, expected: cmd.affected_sop_instance.clone() });
        }
        let kind = if PET_STORAGE_CLASSES.contains(&sop_class.as_str()) { JobKind::Pet } else { JobKind::Passthrough };
        if kind == JobKind::Pet {
            check_pixel_length(&obj)?;
        }

        if self.journal.has_instance(&series, &sop)? {
            return Ok(Recorded::Duplicate { job_id: crate::journal::job_id(&series) });
        }
        let free = spool::free_bytes(self.spool.root()).map_err(StoreError::Disk)?;
        if free < self.min_free_bytes {
            return Err(StoreError::LowDisk { free_mb: free / (1024 * 1024) });
        }

        let rel: PathBuf = spool::Spool::relative_path(&study, &series, &sop)
            .ok_or(StoreError::BadUid { what: "UID", value: sop.clone() })?;
        let header = part10::header(&sop_class, &sop, &ctx.transfer_syntax, &ctx.calling_ae).map_err(StoreError::Unparseable)?;
        // A file already at this name without a journal record is a leftover
        // of a crash before the journal write: it was never acknowledged, so
        // replacing it is safe. Otherwise never overwrite.
        let abs = self.spool.absolute(&rel);
        let replace = abs.exists();
        let written = spool::write_durable(&abs, &[&header, &dataset], replace).map_err(StoreError::Disk)?;
        debug_assert_eq!(written, Written::Created);

        let arrival = Arrival {
            kind,
            study_uid: study,
            series_uid: series,
            modality: obj.str_of(tags::MODALITY),
            calling_ae: ctx.calling_ae.clone(),
            number_of_slices: obj.i64_of(tags::NUMBER_OF_SLICES).and_then(|n| u32::try_from(n).ok()),
            record: InstanceRecord {
                sop_instance_uid: sop,
                sop_class_uid: sop_class,
                path: rel,
                transfer_syntax: ctx.transfer_syntax.clone(),
                image_index: obj.i64_of(tags::IMAGE_INDEX).and_then(|n| u32::try_from(n).ok()),
            },
        };
        let recorded = self.journal.record(&arrival)?;
        self.journal.flush()?;
        Ok(recorded)
    }
}

/// A truncated Pixel Data element is the commonest broken instance.
fn check_pixel_length(obj: &InMemDicomObject) -> Result<(), StoreError> {
    let Ok(Some(px)) = obj.element_opt(tags::PIXEL_DATA) else { return Err(StoreError::Missing("Pixel Data")) };
    let Ok(bytes) = px.to_bytes() else { return Ok(()) }; // encapsulated: not ours to check
    let rows = obj.u16_of(tags::ROWS).ok_or(StoreError::Missing("Rows"))? as usize;
    let cols = obj.u16_of(tags::COLUMNS).ok_or(StoreError::Missing("Columns"))? as usize;
    let bits = obj.u16_of(tags::BITS_ALLOCATED).ok_or(StoreError::Missing("Bits Allocated"))? as usize;
    let frames = obj.str_of(tags::NUMBER_OF_FRAMES).and_then(|s| s.parse::<usize>().ok()).unwrap_or(1);
    let expected = rows * cols * frames * bits.div_ceil(8);
    // Odd lengths are padded to even.
    if bytes.len() != expected && bytes.len() != expected + (expected & 1) {
        return Err(StoreError::PixelLength { found: bytes.len(), expected });
    }
    Ok(())
}

impl StoreSink for SpoolSink {
    fn store(&self, ctx: &StoreContext, cmd: &Command, dataset: Vec<u8>) -> StoreStatus {
        match self.try_store(ctx, cmd, dataset) {
            Ok(Recorded::Duplicate { job_id }) => {
                tracing::info!(job = %job_id, sop = %cmd.affected_sop_instance, "duplicate instance acknowledged, not stored again");
                StoreStatus { status: status::SUCCESS, comment: None }
            }
            Ok(Recorded::New { job_id, complete }) => {
                if complete {
                    tracing::info!(job = %job_id, "series complete");
                    self.wake.notify_one();
                }
                StoreStatus { status: status::SUCCESS, comment: None }
            }
            Err(e) => {
                tracing::warn!(calling = %ctx.calling_ae, sop = %cmd.affected_sop_instance, error = %e, "C-STORE refused");
                StoreStatus { status: e.status(), comment: Some(e.to_string()) }
            }
        }
    }
}

/// The demo's (and tests') receiving sink: every instance becomes a file
/// `<dir>/<SOP Instance UID>.dcm`, written durably.
pub struct FolderSink {
    pub dir: PathBuf,
}

impl StoreSink for FolderSink {
    fn store(&self, ctx: &StoreContext, cmd: &Command, dataset: Vec<u8>) -> StoreStatus {
        let sop = cmd.affected_sop_instance.trim_end_matches('\0');
        if !valid_uid(sop) {
            return StoreStatus { status: status::CANNOT_UNDERSTAND, comment: Some(format!("invalid SOP Instance UID {sop:?}")) };
        }
        let r = part10::header(cmd.affected_sop_class.trim_end_matches('\0'), sop, &ctx.transfer_syntax, &ctx.calling_ae)
            .map_err(std::io::Error::other)
            .and_then(|h| spool::write_durable(&self.dir.join(format!("{sop}.dcm")), &[&h, &dataset], true));
        match r {
            Ok(_) => StoreStatus { status: status::SUCCESS, comment: None },
            Err(e) => StoreStatus { status: status::OUT_OF_RESOURCES, comment: Some(e.to_string()) },
        }
    }
}
