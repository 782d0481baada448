//! The password policy control (draft-behera-ldap-password-policy, OpenLDAP's
//! `ppolicy` overlay), asked for on every user bind so a refusal can say "locked"
//! rather than "wrong password" in postern's log. The client gets the same answer
//! either way.

use ldap3::asn1::{PL, StructureTag, TagClass, parse_tag, parse_uint};
use ldap3::controls::RawControl;

/// The control's OID, for the request and the response.
pub const OID: &str = "1.3.6.1.4.1.42.2.27.8.5.1";

/// `PasswordPolicyResponseValue.error` values that mean the account cannot log in
/// whatever the password (draft-behera §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyError {
    /// `accountLocked (1)`: too many failures or locked by an administrator.
    AccountLocked,
    /// `passwordExpired (0)`.
    PasswordExpired,
    /// Any other error value (`changeAfterReset (2)` and the ones about changing a
    /// password).
    Other(u64),
}

/// The request control: no value, not critical (a server without the overlay, Active
/// Directory included, ignores it; RFC 4511 §4.1.11).
pub fn request() -> RawControl {
    RawControl {
        ctype: OID.to_owned(),
        crit: false,
        val: None,
    }
}

/// The `error` field of a response control's value, if it has one. A value that does
/// not decode gives `None`: the control only adds detail to a refusal.
///
/// ```text
/// PasswordPolicyResponseValue ::= SEQUENCE {
///     warning [0] CHOICE { timeBeforeExpiration [0] INTEGER,
///                          graceAuthNsRemaining [1] INTEGER } OPTIONAL,
///     error   [1] ENUMERATED { passwordExpired (0), accountLocked (1), ... } OPTIONAL }
/// ```
pub fn error(value: &[u8]) -> Option<PolicyError> {
    let (_, tag) = parse_tag(value).ok()?;
    let StructureTag {
        payload: PL::C(fields),
        ..
    } = tag
    else {
        return None;
    };
    let field = fields
        .iter()
        .find(|f| f.class == TagClass::Context && f.id == 1)?;
    let PL::P(bytes) = &field.payload else {
        return None;
    };
    if bytes.is_empty() || bytes.len() > 8 {
        return None;
    }
    let (_, code) = parse_uint(bytes).ok()?;
    Some(match code {
        0 => PolicyError::PasswordExpired,
        1 => PolicyError::AccountLocked,
        other => PolicyError::Other(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_values_decode() {
        for (value, expected) in [
            // error: accountLocked, as slapd sends it with ppolicy_use_lockout.
            (
                &[0x30, 0x03, 0x81, 0x01, 0x01][..],
                Some(PolicyError::AccountLocked),
            ),
            (
                &[0x30, 0x03, 0x81, 0x01, 0x00],
                Some(PolicyError::PasswordExpired),
            ),
            (&[0x30, 0x03, 0x81, 0x01, 0x02], Some(PolicyError::Other(2))),
            // A warning (timeBeforeExpiration 300) and then an error.
            (
                &[
                    0x30, 0x09, 0xa0, 0x04, 0x80, 0x02, 0x01, 0x2c, 0x81, 0x01, 0x01,
                ],
                Some(PolicyError::AccountLocked),
            ),
            // A warning only, and an empty sequence: no error.
            (&[0x30, 0x06, 0xa0, 0x04, 0x81, 0x02, 0x00, 0x03], None),
            (&[0x30, 0x00], None),
            // Garbage.
            (&[], None),
            (&[0x30], None),
            (&[0x30, 0x05, 0x81, 0x01], None),
            (&[0x04, 0x01, 0x01], None),
            (&[0x30, 0x02, 0x81, 0x00], None),
        ] {
            assert_eq!(error(value), expected, "{value:02x?}");
        }
    }

    #[test]
    fn the_request_is_not_critical() {
        let control = request();
        assert_eq!(control.ctype, OID);
        assert!(!control.crit);
        assert!(control.val.is_none());
    }
}
