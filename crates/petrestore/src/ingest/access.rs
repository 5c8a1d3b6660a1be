//! Who may open an association: calling AE allow-list (optionally pinned to
//! a host) and the called AE title.

use std::net::IpAddr;

use dicom_ul::association::server::{AccessControl, Negotiation};
use dicom_ul::pdu::RequestorRoles;
use dicom_ul::pdu::{AssociationRJServiceUserReason, UserIdentity};

use crate::config::AllowedCaller;

/// Access policy for one incoming connection (it knows the peer's address,
/// which dicom-ul's trait does not pass).
pub struct CallerPolicy {
    /// `None`: anyone may call (the demo's built-in receiver).
    pub allowed: Option<Vec<AllowedCaller>>,
    pub peer: IpAddr,
    /// Draining: every new association is rejected (no reason given),
    /// except an archive's that reports storage commitment (`reporters`):
    /// the jobs running finish only with its report. Plain connections are
    /// refused before this, as transient ([`super::gate::reject_draining`]);
    /// this refuses TLS ones.
    pub draining: bool,
    /// Destinations with storage commitment ([`commitment_callers`]).
    pub reporters: Vec<AllowedCaller>,
}

impl AccessControl for CallerPolicy {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if called_ae_title.trim() != this_ae_title.trim() {
            tracing::warn!(called = called_ae_title, ours = this_ae_title, peer = %self.peer,
                "association rejected: called AE title is not ours");
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if self.draining && !allows(&self.reporters, calling_ae_title, self.peer) {
            tracing::warn!(peer = %self.peer, calling = calling_ae_title, "association rejected: draining");
            return Err(AssociationRJServiceUserReason::NoReasonGiven);
        }
        let Some(allowed) = &self.allowed else { return Ok(()) };
        let calling = calling_ae_title.trim();
        if allows(allowed, calling, self.peer) {
            Ok(())
        } else {
            tracing::warn!(calling, peer = %self.peer,
                "association rejected: calling AE title (and host) not in dicom.allowed_callers");
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

/// Whether `calling` from `peer` is on the list.
pub fn allows(allowed: &[AllowedCaller], calling: &str, peer: IpAddr) -> bool {
    allowed.iter().any(|a| a.ae_title == calling.trim() && a.host.is_none_or(|h| h == peer))
}

/// Destinations with storage commitment may call to report it: their AE
/// title, from their host when the address is an IP address.
pub fn commitment_callers(destinations: &[crate::config::Destination]) -> Vec<AllowedCaller> {
    destinations
        .iter()
        .filter(|d| d.commitment.is_some())
        .map(|d| AllowedCaller { ae_title: d.ae_title.clone(), host: d.address.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()) })
        .collect()
}

/// SCU/SCP role selection: only an archive sending storage commitment
/// reports asks for a role here (the SCP role of the Push Model, on the
/// association it opens to report); every other SOP class keeps the
/// default roles.
pub struct CommitmentRoles;

impl Negotiation for CommitmentRoles {
    fn negotiate_roles(&self, sop_class_uid: &str, scu_role: bool, scp_role: bool) -> Option<RequestorRoles> {
        (sop_class_uid.trim_end_matches('\0') == crate::dicom::commitment::PUSH_MODEL)
            .then_some(RequestorRoles { scu: scu_role, scp: scp_role })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_with_host() {
        let p = CallerPolicy {
            allowed: Some(vec![
                AllowedCaller { ae_title: "CONSOLE".into(), host: Some("10.0.0.1".parse().unwrap()) },
                AllowedCaller { ae_title: "WS".into(), host: None },
            ]),
            peer: "10.0.0.2".parse().unwrap(),
            draining: false,
            reporters: vec![],
        };
        assert!(p.check_access("ME", "WS", "ME", None).is_ok());
        assert_eq!(p.check_access("ME", "CONSOLE", "ME", None), Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized));
        assert_eq!(p.check_access("ME", "WS", "YOU", None), Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized));
        let p = CallerPolicy { allowed: Some(vec![]), peer: "10.0.0.1".parse().unwrap(), draining: false, reporters: vec![] };
        assert!(p.check_access("ME", "WS", "ME", None).is_err(), "empty list rejects everyone");
    }
}
