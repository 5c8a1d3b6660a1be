//! DIMSE command sets (PS3.7): parse requests, build responses and requests.
//! Command sets are always Implicit VR Little Endian.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::attrs::Attrs;

pub const C_STORE_RQ: u16 = 0x0001;
pub const C_STORE_RSP: u16 = 0x8001;
pub const C_ECHO_RQ: u16 = 0x0030;
pub const C_ECHO_RSP: u16 = 0x8030;
pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
pub const N_ACTION_RQ: u16 = 0x0130;
pub const N_ACTION_RSP: u16 = 0x8130;
/// Command Data Set Type meaning "no data set follows".
pub const NO_DATASET: u16 = 0x0101;

/// DIMSE status codes used here (PS3.4 Annex B for storage).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Out of resources: the disk or the journal cannot take it.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Data set does not match SOP class.
    pub const DATASET_MISMATCH: u16 = 0xA900;
    /// Cannot understand: the data set could not be parsed or is invalid.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Processing failure (DIMSE generic failure).
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// No such event type (N-EVENT-REPORT).
    pub const NO_SUCH_EVENT_TYPE: u16 = 0x0113;
    /// Refused: not authorized (this caller may not store here).
    pub const NOT_AUTHORIZED: u16 = 0x0124;
    /// Unrecognized operation: a command this node does not perform.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;

    /// Success or warning (0x0000, 0x0001, 0xBxxx).
    pub fn is_ok(s: u16) -> bool {
        s == SUCCESS || s == 0x0001 || (s & 0xF000) == 0xB000
    }
}

/// The fields of a DIMSE request we act upon.
#[derive(Debug, Clone)]
pub struct Command {
    pub command_field: u16,
    pub message_id: u16,
    pub affected_sop_class: String,
    pub affected_sop_instance: String,
    pub has_dataset: bool,
    /// Status, for responses.
    pub status: Option<u16>,
    pub error_comment: Option<String>,
    /// Event Type ID (N-EVENT-REPORT).
    pub event_type_id: Option<u16>,
}

/// Why a command set could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("command set is not valid implicit VR little endian: {0}")]
    Parse(String),
    #[error("command set lacks {0}")]
    Missing(&'static str),
}

impl Command {
    /// Parse a complete command set.
    pub fn parse(bytes: &[u8]) -> Result<Command, CommandError> {
        let ts = super::transfer_syntax(super::IMPLICIT_VR_LE).expect("implicit VR LE registered");
        super::guard::check_lengths(bytes, false).map_err(CommandError::Parse)?;
        let obj = InMemDicomObject::read_dataset_with_ts(bytes, ts).map_err(|e| CommandError::Parse(e.to_string()))?;
        let command_field = obj.u16_of(tags::COMMAND_FIELD).ok_or(CommandError::Missing("Command Field"))?;
        let message_id = obj
            .u16_of(tags::MESSAGE_ID)
            .or_else(|| obj.u16_of(tags::MESSAGE_ID_BEING_RESPONDED_TO))
            .ok_or(CommandError::Missing("Message ID"))?;
        let dst = obj.u16_of(tags::COMMAND_DATA_SET_TYPE).ok_or(CommandError::Missing("Command Data Set Type"))?;
        Ok(Command {
            command_field,
            message_id,
            affected_sop_class: obj.str_of(tags::AFFECTED_SOP_CLASS_UID).unwrap_or_default(),
            affected_sop_instance: obj.str_of(tags::AFFECTED_SOP_INSTANCE_UID).unwrap_or_default(),
            has_dataset: dst != NO_DATASET,
            status: obj.u16_of(tags::STATUS),
            error_comment: obj.str_of(tags::ERROR_COMMENT),
            event_type_id: obj.u16_of(tags::EVENT_TYPE_ID),
        })
    }
}

fn encode(obj: &InMemDicomObject) -> Vec<u8> {
    let ts = super::transfer_syntax(super::IMPLICIT_VR_LE).expect("implicit VR LE registered");
    let mut out = Vec::with_capacity(256);
    obj.write_dataset_with_ts(&mut out, ts).expect("command sets always encode");
    out
}

fn with_group_length(mut elems: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
    // Command Group Length counts every element after itself.
    let body = encode(&InMemDicomObject::command_from_element_iter(elems.clone()));
    elems.insert(0, DataElement::new(tags::COMMAND_GROUP_LENGTH, VR::UL, PrimitiveValue::from(body.len() as u32)));
    encode(&InMemDicomObject::command_from_element_iter(elems))
}

fn ui(tag: Tag, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::UI, PrimitiveValue::from(v))
}
fn us(tag: Tag, v: u16) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::US, PrimitiveValue::from(v))
}

/// A C-STORE-RSP (or C-ECHO-RSP) for `rq` with `status`.
pub fn response(rq: &Command, status: u16, comment: Option<&str>) -> Vec<u8> {
    let rsp_field = if rq.command_field == C_ECHO_RQ { C_ECHO_RSP } else { rq.command_field | 0x8000 };
    let mut e = vec![ui(tags::AFFECTED_SOP_CLASS_UID, &rq.affected_sop_class), us(tags::COMMAND_FIELD, rsp_field)];
    e.push(us(tags::MESSAGE_ID_BEING_RESPONDED_TO, rq.message_id));
    e.push(us(tags::COMMAND_DATA_SET_TYPE, NO_DATASET));
    e.push(us(tags::STATUS, status));
    if !rq.affected_sop_instance.is_empty() {
        e.push(ui(tags::AFFECTED_SOP_INSTANCE_UID, &rq.affected_sop_instance));
    }
    if let (N_EVENT_REPORT_RQ, Some(t)) = (rq.command_field, rq.event_type_id) {
        e.push(us(tags::EVENT_TYPE_ID, t));
    }
    if let Some(c) = comment {
        // Error Comment is LO: at most 64 characters.
        let c: String = c.chars().filter(|c| *c != '\\').take(64).collect();
        e.push(DataElement::new(tags::ERROR_COMMENT, VR::LO, PrimitiveValue::from(c)));
    }
    with_group_length(e)
}

/// A C-STORE-RQ command set.
pub fn store_request(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    with_group_length(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, sop_class),
        us(tags::COMMAND_FIELD, C_STORE_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, sop_instance),
    ])
}

/// An N-ACTION-RQ of the Storage Commitment Push Model (a data set follows).
pub fn commitment_request(message_id: u16) -> Vec<u8> {
    use super::commitment::{ACTION_REQUEST, PUSH_MODEL, PUSH_MODEL_INSTANCE};
    with_group_length(vec![
        us(tags::COMMAND_FIELD, N_ACTION_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        ui(tags::REQUESTED_SOP_CLASS_UID, PUSH_MODEL),
        ui(tags::REQUESTED_SOP_INSTANCE_UID, PUSH_MODEL_INSTANCE),
        us(tags::ACTION_TYPE_ID, ACTION_REQUEST),
    ])
}

/// An N-EVENT-REPORT-RQ of the Storage Commitment Push Model (a data set
/// follows): what an archive sends (tests).
pub fn commitment_report(message_id: u16, event_type: u16) -> Vec<u8> {
    use super::commitment::{PUSH_MODEL, PUSH_MODEL_INSTANCE};
    with_group_length(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, PUSH_MODEL),
        us(tags::COMMAND_FIELD, N_EVENT_REPORT_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
        ui(tags::AFFECTED_SOP_INSTANCE_UID, PUSH_MODEL_INSTANCE),
        us(tags::EVENT_TYPE_ID, event_type),
    ])
}

/// A C-ECHO-RQ command set.
pub fn echo_request(message_id: u16) -> Vec<u8> {
    with_group_length(vec![
        ui(tags::AFFECTED_SOP_CLASS_UID, super::VERIFICATION),
        us(tags::COMMAND_FIELD, C_ECHO_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::COMMAND_DATA_SET_TYPE, NO_DATASET),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_request_round_trips() {
        let b = store_request(7, "1.2.3", "4.5.6");
        let c = Command::parse(&b).unwrap();
        assert_eq!((c.command_field, c.message_id, c.has_dataset), (C_STORE_RQ, 7, true));
        assert_eq!((c.affected_sop_class.as_str(), c.affected_sop_instance.as_str()), ("1.2.3", "4.5.6"));
        let r = Command::parse(&response(&c, status::OUT_OF_RESOURCES, Some("disk full"))).unwrap();
        assert_eq!((r.command_field, r.message_id, r.status), (C_STORE_RSP, 7, Some(0xA700)));
        assert_eq!(r.error_comment.as_deref(), Some("disk full"));
        assert!(!r.has_dataset);
    }

    #[test]
    fn commitment_commands_round_trip() {
        let a = Command::parse(&commitment_request(3)).unwrap();
        assert_eq!((a.command_field, a.message_id, a.has_dataset), (N_ACTION_RQ, 3, true));
        let r = Command::parse(&commitment_report(9, 1)).unwrap();
        assert_eq!((r.command_field, r.event_type_id), (N_EVENT_REPORT_RQ, Some(1)));
        let rsp = Command::parse(&response(&r, status::SUCCESS, None)).unwrap();
        assert_eq!((rsp.command_field, rsp.message_id, rsp.event_type_id), (N_EVENT_REPORT_RSP, 9, Some(1)));
        assert_eq!(rsp.affected_sop_instance, super::super::commitment::PUSH_MODEL_INSTANCE);
    }

    #[test]
    fn echo_response_answers_the_same_message_id() {
        let c = Command::parse(&echo_request(42)).unwrap();
        let r = Command::parse(&response(&c, status::SUCCESS, None)).unwrap();
        assert_eq!((r.command_field, r.message_id, r.status), (C_ECHO_RSP, 42, Some(0)));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Command::parse(&[1, 2, 3]).is_err());
    }
}
