//! Telling systemd what the daemon does (`Type=notify`, `sd_notify(3)`):
//! `READY=1` once enforcement is attached, `RELOADING=1` and `READY=1`
//! around a reload, `STOPPING=1`, and `STATUS=` lines that
//! `systemctl status` shows. Outside systemd (no `NOTIFY_SOCKET`) every
//! call does nothing.
//!
//! A message that cannot be sent is logged, never an error: enforcement
//! does not depend on the service manager hearing about it.

use sd_notify::NotifyState;

/// Whether a service manager listens: callers skip building a status line
/// nobody reads.
#[must_use]
pub fn listening() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Enforcement is in place (after `up` attached, or after a reload).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts; [`ready`] ends it, whatever its outcome.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!(error = %e, "sd_notify: cannot read CLOCK_MONOTONIC"),
    }
}

/// The daemon is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// A new status line.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify: cannot reach the service manager");
    }
}
