//! Lockout protection: refuse to enforce an SSH allow-list that does not
//! contain the address of the SSH session running `ztxdp up`.

use std::net::IpAddr;

use ipnet::IpNet;

/// Why `up` refuses to start.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockoutError {
    #[error(
        "refusing to start: your SSH session comes from {client}, which is not in edge.ssh_allow, \
         so enforcing this policy would cut you off. Add {client}/32 (or /128) to edge.ssh_allow, \
         or pass --allow-lockout if you have another way in"
    )]
    WouldLockOut { client: IpAddr },
    #[error(
        "SSH_CONNECTION is set but not understood ({value:?}); pass --allow-lockout to proceed"
    )]
    Unparsable { value: String },
}

/// Checks `SSH_CONNECTION` ("`client_ip` `client_port` `server_ip` `server_port`")
/// against the allow-list. No variable means no SSH session to protect.
///
/// # Errors
/// When the session's client address is outside `allow`.
pub fn check(ssh_connection: Option<&str>, allow: &[IpNet]) -> Result<(), LockoutError> {
    let Some(value) = ssh_connection else {
        return Ok(());
    };
    let client: IpAddr = value
        .split_whitespace()
        .next()
        // OpenSSH may report an IPv4 client as ::ffff:a.b.c.d.
        .and_then(|a| a.parse::<IpAddr>().ok())
        .map(|a| a.to_canonical())
        .ok_or_else(|| LockoutError::Unparsable {
            value: value.to_owned(),
        })?;
    if allow.iter().any(|net| net.contains(&client)) {
        Ok(())
    } else {
        Err(LockoutError::WouldLockOut { client })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
            .collect()
    }

    #[test]
    fn no_session_is_fine() {
        assert_eq!(check(None, &[]), Ok(()));
    }

    #[test]
    fn a_session_from_an_allowed_address_is_fine() {
        assert_eq!(
            check(
                Some("192.0.2.10 51000 192.0.2.1 22"),
                &nets(&["192.0.2.0/24"])
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Some("2001:db8:1::5 51000 2001:db8::1 22"),
                &nets(&["2001:db8:1::/64"])
            ),
            Ok(())
        );
        assert_eq!(
            check(
                Some("::ffff:192.0.2.10 51000 ::ffff:192.0.2.1 22"),
                &nets(&["192.0.2.10/32"])
            ),
            Ok(())
        );
    }

    #[test]
    fn a_session_from_elsewhere_is_refused() {
        let err = check(
            Some("198.51.100.7 51000 192.0.2.1 22"),
            &nets(&["192.0.2.0/24"]),
        );
        assert_eq!(
            err,
            Err(LockoutError::WouldLockOut {
                client: "198.51.100.7".parse().unwrap_or_else(|e| panic!("{e}"))
            })
        );
        assert!(check(Some("garbage"), &[]).is_err());
    }
}
