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
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread,
    time::{Duration, Instant},
};

use crate::netns::{NetNs, NetNsError, veth_pair};

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

/// Links come up in milliseconds; this only bounds a broken setup.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// The four namespaces; fields drop (and so are deleted) hosts first.
#[derive(Debug)]
pub struct Lab {
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
}

fn step(what: impl Into<String>) -> impl FnOnce(NetNsError) -> LabError {
    let step = what.into();
    move |source| LabError::Step { step, source }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};

    use super::*;

    #[test]
    fn hosts_reach_the_edge_over_both_families_and_teardown_is_complete() {
        let lab = Lab::create().unwrap_or_else(|error| panic!("Lab::create (root?): {error:?}"));
        let names: Vec<String> = [lab.edge(), lab.bastion(), lab.outsider(), lab.switch()]
            .iter()
            .map(|ns| ns.name().to_owned())
            .collect();
        let listener = lab
            .edge()
            .enter(|| TcpListener::bind("[::]:0"))
            .unwrap_or_else(|error| panic!("enter edge: {error}"))
            .unwrap_or_else(|error| panic!("bind in edge: {error}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("listener address: {error}"))
            .port();
        let hosts = [
            (lab.bastion(), BASTION_V4, BASTION_V6),
            (lab.outsider(), OUTSIDER_V4, OUTSIDER_V6),
        ];
        for (host, v4, v6) in hosts {
            for (target, source) in [
                (IpAddr::V4(EDGE_V4), IpAddr::V4(v4)),
                (IpAddr::V6(EDGE_V6), IpAddr::V6(v6)),
            ] {
                let connected = host
                    .enter(|| {
                        TcpStream::connect_timeout(
                            &SocketAddr::new(target, port),
                            Duration::from_secs(3),
                        )
                    })
                    .unwrap_or_else(|error| panic!("enter {}: {error}", host.name()));
                if let Err(error) = connected {
                    panic!("{} -> {target}:{port}: {error}", host.name());
                }
                let (_, peer) = listener
                    .accept()
                    .unwrap_or_else(|error| panic!("accept from {}: {error}", host.name()));
                assert_eq!(
                    peer.ip().to_canonical(),
                    source,
                    "wrong source address seen by the edge"
                );
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
        drop(listener);
        drop(lab);
        let listing = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap_or_else(|error| panic!("ip netns list: {error}"));
        let listing = String::from_utf8_lossy(&listing.stdout);
        for name in names {
            assert!(
                !listing.contains(&name),
                "{name} survived the lab's drop:\n{listing}"
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
        let listing = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap_or_else(|error| panic!("ip netns list: {error}"));
        let listing = String::from_utf8_lossy(&listing.stdout);
        for name in names {
            assert!(
                !listing.contains(&name),
                "{name} survived the panic:\n{listing}"
            );
        }
    }
}
