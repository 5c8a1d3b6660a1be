//! Storage Commitment Push Model (PS3.4 Annex J): the N-ACTION request a
//! sender makes after its C-STOREs ("do you take responsibility for these
//! instances?") and the N-EVENT-REPORT the archive answers with, possibly
//! on another association.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use sha2::{Digest, Sha256};

use super::attrs::Attrs;

/// Storage Commitment Push Model SOP Class.
pub const PUSH_MODEL: &str = "1.2.840.10008.1.20.1";
/// Its well-known SOP Instance.
pub const PUSH_MODEL_INSTANCE: &str = "1.2.840.10008.1.20.1.1";
/// N-ACTION Action Type "request storage commitment".
pub const ACTION_REQUEST: u16 = 1;
/// N-EVENT-REPORT Event Type: every instance committed.
pub const EVENT_ALL_COMMITTED: u16 = 1;
/// N-EVENT-REPORT Event Type: some instances failed.
pub const EVENT_FAILURES: u16 = 2;

/// One instance: SOP Class UID and SOP Instance UID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SopRef {
    pub class: String,
    pub instance: String,
}

/// A fingerprint of a set of instances (order does not matter): what the
/// sender keeps instead of the list, to check a report against.
pub fn digest(refs: &[SopRef]) -> String {
    let mut sorted: Vec<&SopRef> = refs.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for r in sorted {
        h.update(r.class.as_bytes());
        h.update(b"\\");
        h.update(r.instance.as_bytes());
        h.update(b"\n");
    }
    format!("{:x}", h.finalize())
}

fn item(r: &SopRef) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::REFERENCED_SOP_CLASS_UID, VR::UI, PrimitiveValue::from(r.class.as_str())),
        DataElement::new(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(r.instance.as_str())),
    ])
}

/// The N-ACTION-RQ data set: the transaction and the instances.
pub fn request_dataset(transaction_uid: &str, refs: &[SopRef]) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::TRANSACTION_UID, VR::UI, PrimitiveValue::from(transaction_uid)),
        DataElement::new(
            tags::REFERENCED_SOP_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(refs.iter().map(item).collect::<Vec<_>>()),
        ),
    ])
}

/// What an archive reported for one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub transaction_uid: String,
    pub committed: Vec<SopRef>,
    /// Failed instances with their Failure Reason (PS3.4 J.3.3.1.1).
    pub failed: Vec<(SopRef, u16)>,
}

impl Report {
    /// Read an N-EVENT-REPORT-RQ data set.
    pub fn parse(obj: &InMemDicomObject) -> Result<Report, String> {
        let transaction_uid = obj.str_of(tags::TRANSACTION_UID).ok_or("the report has no Transaction UID")?;
        let refs = |tag| -> Vec<(SopRef, u16)> {
            let Ok(e) = obj.element(tag) else { return Vec::new() };
            let Some(items) = e.items() else { return Vec::new() };
            items
                .iter()
                .map(|i| {
                    (
                        SopRef {
                            class: i.str_of(tags::REFERENCED_SOP_CLASS_UID).unwrap_or_default(),
                            instance: i.str_of(tags::REFERENCED_SOP_INSTANCE_UID).unwrap_or_default(),
                        },
                        i.u16_of(tags::FAILURE_REASON).unwrap_or(0),
                    )
                })
                .collect()
        };
        Ok(Report {
            transaction_uid,
            committed: refs(tags::REFERENCED_SOP_SEQUENCE).into_iter().map(|(r, _)| r).collect(),
            failed: refs(tags::FAILED_SOP_SEQUENCE),
        })
    }

    /// The data set an archive sends (tests, and a receiver built on this crate).
    pub fn dataset(&self) -> InMemDicomObject {
        let mut obj = request_dataset(&self.transaction_uid, &self.committed);
        if !self.failed.is_empty() {
            let items: Vec<InMemDicomObject> = self
                .failed
                .iter()
                .map(|(r, why)| {
                    let mut i = item(r);
                    i.put(DataElement::new(tags::FAILURE_REASON, VR::US, PrimitiveValue::from(*why)));
                    i
                })
                .collect();
            obj.put(DataElement::new(tags::FAILED_SOP_SEQUENCE, VR::SQ, dicom_core::value::DataSetSequence::from(items)));
        }
        obj
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(n: usize) -> Vec<SopRef> {
        (0..n).map(|i| SopRef { class: "1.2.840.10008.5.1.4.1.1.128".into(), instance: format!("2.25.{i}") }).collect()
    }

    #[test]
    fn digest_ignores_order_and_sees_every_instance() {
        let a = refs(5);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&refs(4)));
    }

    #[test]
    fn a_report_round_trips_through_its_data_set() {
        let r = Report {
            transaction_uid: "2.25.99".into(),
            committed: refs(3),
            failed: vec![(SopRef { class: "1.2".into(), instance: "2.25.7".into() }, 0x0110)],
        };
        let ts = super::super::transfer_syntax(super::super::EXPLICIT_VR_LE).unwrap();
        let mut bytes = Vec::new();
        r.dataset().write_dataset_with_ts(&mut bytes, ts).unwrap();
        let back = Report::parse(&InMemDicomObject::read_dataset_with_ts(&bytes[..], ts).unwrap()).unwrap();
        assert_eq!(back, r);
        let req = request_dataset("2.25.1", &refs(2));
        assert_eq!(Report::parse(&req).unwrap().committed, refs(2));
    }
}
