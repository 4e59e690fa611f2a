//! The reference topology of `cargo xtask run` and the tier-3 tests.
//!
//! ```text
//!   edge (eth0)         bastion (eth0)        outsider (eth0)
//!   10.77.0.1/24        10.77.0.2/24          10.77.0.3/24
//!   fd77::1/64          fd77::2/64            fd77::3/64
//!        \                    |                    /
//!         +------------- switch: br0 -------------+
//! ```
//!
//! Every host sees its link as `eth0`, so `examples/lab.toml`
//! (`interface = "eth0"`) works unchanged in the edge namespace. All four
//! namespaces are unique per lab and removed when the [`Lab`] is dropped.
//!
//! [`Lab::create_with_tunnel`] adds two app peers on the same switch and a
//! `WireGuard` tunnel (wireguard-go) from each of them to the edge, so the
//! handshakes cross the edge's eth0:
//!
//! ```text
//!   app-1 (eth0)  10.77.0.11/24  fd77::11/64   `WireGuard` to 10.77.0.1:51820
//!                 tunnel 10.100.0.1/24  fd00:100::1/64
//!   app-2 (eth0)  10.77.0.12/24  fd77::12/64   `WireGuard` to [fd77::1]:51820
//!                 tunnel 10.100.0.2/24  fd00:100::2/64
//!   edge          tunnel 10.100.0.254/24  fd00:100::fe/64
//! ```
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use crate::{
    netns::{NetNs, NetNsError, veth_pair},
    wg::{LISTEN_PORT, WgDevice, WgError},
};

/// The interface name of every host's link into the switch.
pub const HOST_INTERFACE: &str = "eth0";
/// The bridge inside the switch namespace.
pub const BRIDGE: &str = "br0";
pub const PREFIX_V4: u8 = 24;
pub const PREFIX_V6: u8 = 64;
pub const EDGE_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const EDGE_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
pub const BASTION_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const BASTION_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
pub const OUTSIDER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
pub const OUTSIDER_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3);
pub const APP_1_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
pub const APP_1_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x11);
pub const APP_2_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);
pub const APP_2_V6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x12);

/// Addresses inside the `WireGuard` tunnel ([`Lab::create_with_tunnel`]).
pub const TUNNEL_PREFIX_V4: u8 = 24;
pub const TUNNEL_PREFIX_V6: u8 = 64;
pub const EDGE_TUNNEL_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 254);
pub const EDGE_TUNNEL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0xfe);
pub const APP_1_TUNNEL_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
pub const APP_1_TUNNEL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
pub const APP_2_TUNNEL_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
pub const APP_2_TUNNEL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);

/// Links come up in milliseconds; this only bounds a broken setup.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// A handshake between namespaces takes milliseconds; wireguard-go retries
/// a lost one after 5 s, so this allows one retry.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(12);
/// The usual `PersistentKeepalive`; [`Tunnel::handshake`] turns it on.
const KEEPALIVE_SECONDS: u16 = 25;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("building the lab failed while {step}")]
    Step {
        step: String,
        #[source]
        source: NetNsError,
    },
    #[error("bridge port {port} in {switch} is not forwarding after {timeout:?}")]
    PortNotForwarding {
        switch: String,
        port: String,
        timeout: Duration,
    },
    #[error("building the tunnel failed while {step}")]
    Tunnel {
        step: String,
        #[source]
        source: WgError,
    },
    #[error("{peer} completed no WireGuard handshake with the edge within {timeout:?}")]
    NoHandshake { peer: String, timeout: Duration },
}

/// The four namespaces, and the tunnel when asked for; fields drop (and so
/// are deleted) tunnel first, then hosts.
#[derive(Debug)]
pub struct Lab {
    tunnel: Option<Tunnel>,
    edge: NetNs,
    bastion: NetNs,
    outsider: NetNs,
    switch: NetNs,
}

impl Lab {
    /// Builds the topology and returns once every link is up and every
    /// bridge port forwards.
    ///
    /// # Errors
    /// When a namespace, link or address cannot be set up (not root,
    /// iproute2/ethtool missing); whatever was created is removed again.
    pub fn create() -> Result<Self, LabError> {
        let switch = NetNs::new("switch").map_err(step("creating the switch namespace"))?;
        // The switch only forwards frames; an IPv6 stack on its ports would
        // add router solicitations and MLD reports to every capture.
        for key in [
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv6.conf.default.disable_ipv6",
        ] {
            switch
                .sysctl(key, "1")
                .map_err(step("disabling IPv6 in the switch"))?;
        }
        switch
            .ip(&[
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ])
            .map_err(step("creating the bridge"))?;
        switch
            .link_up(BRIDGE)
            .map_err(step("bringing the bridge up"))?;

        let edge = Self::host(&switch, "edge", EDGE_V4, EDGE_V6)?;
        let bastion = Self::host(&switch, "bastion", BASTION_V4, BASTION_V6)?;
        let outsider = Self::host(&switch, "outsider", OUTSIDER_V4, OUTSIDER_V6)?;
        edge.enable_gro(HOST_INTERFACE)
            .map_err(step("enabling GRO on the edge's eth0"))?;

        let lab = Self {
            tunnel: None,
            edge,
            bastion,
            outsider,
            switch,
        };
        for (host, port) in [
            (&lab.edge, "edge"),
            (&lab.bastion, "bastion"),
            (&lab.outsider, "outsider"),
        ] {
            host.wait_link_up(HOST_INTERFACE, LINK_TIMEOUT)
                .map_err(step(format!("waiting for {}'s eth0", host.name())))?;
            lab.wait_forwarding(port)?;
        }
        Ok(lab)
    }

    /// [`Self::create`] plus the app peers `app-1` and `app-2`, each with a
    /// wireguard-go device peered with one on the edge (see the module
    /// docs). No handshake has happened yet: the first packet into the
    /// tunnel, or [`Tunnel::handshake`], starts one, so it can be made to
    /// cross a filter loaded on the edge in the meantime.
    ///
    /// Device names are unique on the machine ([`WgDevice::start`]); the
    /// wireguard-go processes and their control sockets go when the lab is
    /// dropped.
    ///
    /// # Errors
    /// As [`Self::create`], or when wireguard-go or `wg` cannot run;
    /// whatever was created is removed again.
    pub fn create_with_tunnel() -> Result<Self, LabError> {
        let mut lab = Self::create()?;
        lab.tunnel = Some(Tunnel::create(&lab)?);
        Ok(lab)
    }

    /// A host namespace named after `role`, linked to the bridge through a
    /// port also named `role`.
    fn host(switch: &NetNs, role: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<NetNs, LabError> {
        let host = NetNs::new(role).map_err(step(format!("creating the {role} namespace")))?;
        // Link-local addresses would otherwise stay tentative for a second or
        // two; the global ones get `nodad` from add_address.
        for key in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            host.sysctl(key, "0")
                .map_err(step(format!("turning off DAD in {role}")))?;
        }
        veth_pair(&host, HOST_INTERFACE, switch, role)
            .map_err(step(format!("linking {role} to the switch")))?;
        switch
            .ip(&["link", "set", role, "master", BRIDGE])
            .map_err(step(format!("attaching {role}'s port to the bridge")))?;
        host.add_address(HOST_INTERFACE, IpAddr::V4(v4), PREFIX_V4)
            .map_err(step(format!("adding {v4} to {role}")))?;
        host.add_address(HOST_INTERFACE, IpAddr::V6(v6), PREFIX_V6)
            .map_err(step(format!("adding {v6} to {role}")))?;
        Ok(host)
    }

    fn wait_forwarding(&self, port: &str) -> Result<(), LabError> {
        let start = Instant::now();
        loop {
            let details = self
                .switch
                .ip(&["-d", "-o", "link", "show", "dev", port])
                .map_err(step(format!("reading bridge port {port}")))?;
            if details.contains("bridge_slave state forwarding") {
                return Ok(());
            }
            if start.elapsed() >= LINK_TIMEOUT {
                return Err(LabError::PortNotForwarding {
                    switch: self.switch.name().to_owned(),
                    port: port.to_owned(),
                    timeout: LINK_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The protected host: run `ztxdp` here, on [`HOST_INTERFACE`].
    #[must_use]
    pub fn edge(&self) -> &NetNs {
        &self.edge
    }

    /// The host in `edge.ssh_allow`.
    #[must_use]
    pub fn bastion(&self) -> &NetNs {
        &self.bastion
    }

    /// A host with no rights at all.
    #[must_use]
    pub fn outsider(&self) -> &NetNs {
        &self.outsider
    }

    /// Holds the bridge; for captures (`tcpdump -i br0`).
    #[must_use]
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// The `WireGuard` tunnel, when built by [`Self::create_with_tunnel`].
    #[must_use]
    pub fn tunnel(&self) -> Option<&Tunnel> {
        self.tunnel.as_ref()
    }
}

/// The edge's `WireGuard` device and the two app peers; fields drop in order,
/// the edge's device first.
#[derive(Debug)]
pub struct Tunnel {
    edge: WgDevice,
    apps: [AppPeer; 2],
}

impl Tunnel {
    fn create(lab: &Lab) -> Result<Self, LabError> {
        let edge =
            WgDevice::start(lab.edge()).map_err(tunnel_step("starting wireguard-go in edge"))?;
        for (ip, prefix) in [
            (IpAddr::V4(EDGE_TUNNEL_V4), TUNNEL_PREFIX_V4),
            (IpAddr::V6(EDGE_TUNNEL_V6), TUNNEL_PREFIX_V6),
        ] {
            lab.edge()
                .add_address(edge.name(), ip, prefix)
                .map_err(step(format!("adding {ip} to the edge's {}", edge.name())))?;
        }
        // app-2 reaches the edge over IPv6, so the edge filter sees
        // `WireGuard` of both families.
        let apps = [
            AppPeer::create(
                lab,
                &edge,
                AppSpec {
                    name: "app-1",
                    lan: (APP_1_V4, APP_1_V6),
                    tunnel: (APP_1_TUNNEL_V4, APP_1_TUNNEL_V6),
                    edge_endpoint: SocketAddr::new(IpAddr::V4(EDGE_V4), LISTEN_PORT),
                    own_endpoint: SocketAddr::new(IpAddr::V4(APP_1_V4), LISTEN_PORT),
                },
            )?,
            AppPeer::create(
                lab,
                &edge,
                AppSpec {
                    name: "app-2",
                    lan: (APP_2_V4, APP_2_V6),
                    tunnel: (APP_2_TUNNEL_V4, APP_2_TUNNEL_V6),
                    edge_endpoint: SocketAddr::new(IpAddr::V6(EDGE_V6), LISTEN_PORT),
                    own_endpoint: SocketAddr::new(IpAddr::V6(APP_2_V6), LISTEN_PORT),
                },
            )?,
        ];
        Ok(Self { edge, apps })
    }

    /// Turns on keepalives from both apps to the edge, which makes each
    /// complete a handshake without putting a packet into the tunnel, and
    /// waits for both. The handshakes cross the edge's eth0, so they prove
    /// a filter there admits `WireGuard`.
    ///
    /// # Errors
    /// When `wg` fails, or [`LabError::NoHandshake`] after 12 s.
    pub fn handshake(&self) -> Result<(), LabError> {
        let edge_key = self.edge.public_key();
        for app in &self.apps {
            app.device
                .keep_alive(&app.ns, edge_key, KEEPALIVE_SECONDS)
                .map_err(tunnel_step(format!("turning on {}'s keepalives", app.name)))?;
        }
        let start = Instant::now();
        for app in &self.apps {
            loop {
                let done = app
                    .device
                    .handshake_done(&app.ns, edge_key)
                    .map_err(tunnel_step(format!("reading {}'s handshakes", app.name)))?;
                if done {
                    break;
                }
                if start.elapsed() >= HANDSHAKE_TIMEOUT {
                    return Err(LabError::NoHandshake {
                        peer: app.name.to_owned(),
                        timeout: HANDSHAKE_TIMEOUT,
                    });
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The edge's `WireGuard` device: give its name to `tunnel.interface`.
    #[must_use]
    pub fn edge_device(&self) -> &WgDevice {
        &self.edge
    }

    /// `app-1`, then `app-2`.
    #[must_use]
    pub fn apps(&self) -> &[AppPeer; 2] {
        &self.apps
    }

    /// The app peer called `name` (`app-1` or `app-2`).
    #[must_use]
    pub fn app(&self, name: &str) -> Option<&AppPeer> {
        self.apps.iter().find(|app| app.name == name)
    }
}

#[derive(Clone, Copy)]
struct AppSpec {
    name: &'static str,
    lan: (Ipv4Addr, Ipv6Addr),
    tunnel: (Ipv4Addr, Ipv6Addr),
    edge_endpoint: SocketAddr,
    own_endpoint: SocketAddr,
}

/// A host on the switch with a `WireGuard` device peered with the edge's;
/// fields drop in order, the device before its namespace.
#[derive(Debug)]
pub struct AppPeer {
    name: &'static str,
    device: WgDevice,
    ns: NetNs,
    tunnel_v4: Ipv4Addr,
    tunnel_v6: Ipv6Addr,
}

impl AppPeer {
    fn create(lab: &Lab, edge: &WgDevice, spec: AppSpec) -> Result<Self, LabError> {
        let name = spec.name;
        let ns = Lab::host(&lab.switch, name, spec.lan.0, spec.lan.1)?;
        ns.wait_link_up(HOST_INTERFACE, LINK_TIMEOUT)
            .map_err(step(format!("waiting for {name}'s eth0")))?;
        lab.wait_forwarding(name)?;
        let device = WgDevice::start(&ns)
            .map_err(tunnel_step(format!("starting wireguard-go in {name}")))?;
        let app = Self {
            name,
            device,
            ns,
            tunnel_v4: spec.tunnel.0,
            tunnel_v6: spec.tunnel.1,
        };
        for (ip, prefix) in [
            (IpAddr::V4(app.tunnel_v4), TUNNEL_PREFIX_V4),
            (IpAddr::V6(app.tunnel_v6), TUNNEL_PREFIX_V6),
        ] {
            app.ns
                .add_address(app.device.name(), ip, prefix)
                .map_err(step(format!(
                    "adding {ip} to {name}'s {}",
                    app.device.name()
                )))?;
        }
        let app_ips = [
            format!("{}/32", app.tunnel_v4),
            format!("{}/128", app.tunnel_v6),
        ];
        edge.add_peer(
            lab.edge(),
            app.device.public_key(),
            &app_ips.each_ref().map(String::as_str),
            Some(spec.own_endpoint),
        )
        .map_err(tunnel_step(format!("adding {name} as a peer of the edge")))?;
        let edge_ips = [
            format!("{EDGE_TUNNEL_V4}/32"),
            format!("{EDGE_TUNNEL_V6}/128"),
        ];
        app.device
            .add_peer(
                &app.ns,
                edge.public_key(),
                &edge_ips.each_ref().map(String::as_str),
                Some(spec.edge_endpoint),
            )
            .map_err(tunnel_step(format!("adding the edge as a peer of {name}")))?;
        Ok(app)
    }

    /// `app-1` or `app-2`: its peer name in `examples/lab.toml`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    #[must_use]
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    #[must_use]
    pub fn device(&self) -> &WgDevice {
        &self.device
    }

    /// Its address inside the tunnel.
    #[must_use]
    pub fn tunnel_v4(&self) -> Ipv4Addr {
        self.tunnel_v4
    }

    #[must_use]
    pub fn tunnel_v6(&self) -> Ipv6Addr {
        self.tunnel_v6
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(NetNsError) -> LabError {
    let step = what.into();
    move |source| LabError::Step { step, source }
}

fn tunnel_step(what: impl Into<String>) -> impl FnOnce(WgError) -> LabError {
    let step = what.into();
    move |source| LabError::Tunnel { step, source }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};

    use super::*;

    /// A TCP listener on every address of `ns`, on a free port.
    fn listen(ns: &NetNs) -> TcpListener {
        ns.enter(|| TcpListener::bind("[::]:0"))
            .unwrap_or_else(|error| panic!("enter {}: {error}", ns.name()))
            .unwrap_or_else(|error| panic!("bind in {}: {error}", ns.name()))
    }

    /// `host` (called `who`) connects to `target` at `listener`'s port; the
    /// listener must see the connection come from `source`.
    fn expect_connection(
        host: &NetNs,
        who: &str,
        listener: &TcpListener,
        target: IpAddr,
        source: IpAddr,
    ) {
        let port = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("listener address: {error}"))
            .port();
        let connected = host
            .enter(|| TcpStream::connect_timeout(&SocketAddr::new(target, port), HANDSHAKE_TIMEOUT))
            .unwrap_or_else(|error| panic!("enter {who}: {error}"));
        if let Err(error) = connected {
            panic!("{who} -> {target}:{port}: {error}");
        }
        let (_, peer) = listener
            .accept()
            .unwrap_or_else(|error| panic!("accept from {who}: {error}"));
        assert_eq!(
            peer.ip().to_canonical(),
            source,
            "the edge saw {who}'s connection to {target} from the wrong address"
        );
    }

    /// None of the namespaces `names` is left after `event`.
    fn assert_gone(names: &[String], event: &str) {
        for name in names {
            assert!(!crate::netns::listed(name), "{name} survived {event}");
        }
    }

    #[test]
    fn hosts_reach_the_edge_over_both_families_and_teardown_is_complete() {
        let lab = Lab::create().unwrap_or_else(|error| panic!("Lab::create (root?): {error:?}"));
        let names: Vec<String> = [lab.edge(), lab.bastion(), lab.outsider(), lab.switch()]
            .iter()
            .map(|ns| ns.name().to_owned())
            .collect();
        let listener = listen(lab.edge());
        let hosts = [
            (lab.bastion(), BASTION_V4, BASTION_V6),
            (lab.outsider(), OUTSIDER_V4, OUTSIDER_V6),
        ];
        for (host, v4, v6) in hosts {
            for (target, source) in [
                (IpAddr::V4(EDGE_V4), IpAddr::V4(v4)),
                (IpAddr::V6(EDGE_V6), IpAddr::V6(v6)),
            ] {
                expect_connection(host, host.name(), &listener, target, source);
            }
        }
        let edge_link = lab
            .edge()
            .run(&["ethtool", "-k", HOST_INTERFACE])
            .unwrap_or_else(|error| panic!("ethtool -k: {error}"));
        assert!(
            edge_link.contains("generic-receive-offload: on"),
            "GRO is off on the edge's eth0:\n{edge_link}"
        );
        let switch_v6 = lab
            .switch()
            .run(&["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"])
            .unwrap_or_else(|error| panic!("reading the switch's sysctl: {error}"));
        assert_eq!(switch_v6.trim(), "1", "IPv6 is still on in the switch");
        drop(listener);
        drop(lab);
        assert_gone(&names, "the lab's drop");
    }

    #[test]
    fn the_tunnel_carries_both_families_and_teardown_stops_wireguard() {
        let lab = Lab::create_with_tunnel().unwrap_or_else(|error| {
            panic!("Lab::create_with_tunnel (root? wireguard-go?): {error:?}")
        });
        let tunnel = lab
            .tunnel()
            .unwrap_or_else(|| panic!("the lab has no tunnel"));
        for app in tunnel.apps() {
            let early = app
                .device()
                .handshake_done(app.ns(), tunnel.edge_device().public_key())
                .unwrap_or_else(|error| panic!("wg show in {}: {error}", app.name()));
            assert!(
                !early,
                "{} shook hands before Tunnel::handshake, so a filter loaded in between would miss it",
                app.name()
            );
        }
        tunnel
            .handshake()
            .unwrap_or_else(|error| panic!("handshakes with the edge: {error:?}"));
        let listener = listen(lab.edge());
        for app in tunnel.apps() {
            for (target, source) in [
                (IpAddr::V4(EDGE_TUNNEL_V4), IpAddr::V4(app.tunnel_v4())),
                (IpAddr::V6(EDGE_TUNNEL_V6), IpAddr::V6(app.tunnel_v6())),
            ] {
                expect_connection(app.ns(), app.name(), &listener, target, source);
            }
        }
        let devices: Vec<String> = std::iter::once(tunnel.edge_device())
            .chain(tunnel.apps().iter().map(AppPeer::device))
            .map(|device| device.name().to_owned())
            .collect();
        let mut unique = devices.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            3,
            "device names are not distinct: {devices:?}"
        );
        assert_eq!(
            tunnel.app("app-2").map(AppPeer::tunnel_v4),
            Some(APP_2_TUNNEL_V4),
            "app-2 not found by name"
        );
        drop(listener);
        drop(lab);
        for device in devices {
            let socket = format!("/var/run/wireguard/{device}.sock");
            assert!(
                !std::path::Path::new(&socket).exists(),
                "{socket} survived the lab's drop"
            );
        }
    }

    #[test]
    fn a_panic_with_a_lab_alive_still_removes_its_namespaces() {
        let mut names = Vec::new();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let lab =
                Lab::create().unwrap_or_else(|error| panic!("Lab::create (root?): {error:?}"));
            names.extend(
                [lab.edge(), lab.bastion(), lab.outsider(), lab.switch()]
                    .map(|ns| ns.name().to_owned()),
            );
            panic!("simulated test failure");
        }));
        assert!(outcome.is_err(), "the closure must have panicked");
        assert_eq!(names.len(), 4, "the lab was not created");
        assert_gone(&names, "the panic");
    }
}
