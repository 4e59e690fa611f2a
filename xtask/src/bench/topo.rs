//! The test bed: a generator namespace and a DUT namespace joined by a veth
//! pair, torn down on drop (the namespaces delete themselves, and with them
//! the veth and anything attached to it).
//!
//! ```text
//!   netns gen [g0] ======== veth ======== [d0] netns dut (GRO on)
//! ```
//!
//! The DUT side gets GRO on: that gives the veth the NAPI context it needs
//! to receive XDP frames; without it (or a native XDP program on d0) frames
//! sent with `XDP_TX` from g0 vanish without a counter.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use zt_tests::netns::NetNs;

pub const GEN_IF: &str = "g0";
pub const DUT_IF: &str = "d0";
pub const GEN_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x01];
pub const DUT_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0x02];
pub const GEN_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const DUT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The destination of IPv6 frames, which only `test_run` sees: the
/// namespaces have IPv6 off. Outside `2001:db8::/32`, where the IPv6
/// allow-lists are spread.
pub const DUT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);
/// The source the SSH pass-path traffic comes from; on the allow-list.
pub const SSH_ALLOWED: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 50);

/// The two namespaces and a process parked in the DUT one, through whose
/// `/proc/PID/net` the DUT's counters are read without entering it.
pub struct Topology {
    // Dropped first: the process must be gone before its namespace.
    holder: Holder,
    pub dut: NetNs,
    pub src: NetNs,
}

/// DUT counters at one instant.
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub at: Instant,
    /// d0's rx packets (veth counts XDP-dropped frames too).
    pub rx: u64,
    /// IP packets handed to a transport protocol (`Ip: InDelivers`).
    pub delivered: u64,
}

impl Topology {
    /// Builds the namespaces and the veth pair.
    ///
    /// # Errors
    /// When a namespace or link cannot be set up; what was created is removed.
    pub fn new() -> anyhow::Result<Self> {
        let src = NetNs::new("bgen")
            .context("could not create the generator namespace (root? iproute2?)")?;
        let dut = NetNs::new("bdut").context("could not create the DUT namespace")?;
        for ns in [&src, &dut] {
            // No IPv6: router solicitations and MLD reports would add packets
            // the counters cannot tell from the traffic.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        src.ip(&[
            "link",
            "add",
            GEN_IF,
            "address",
            &mac(GEN_MAC),
            "type",
            "veth",
            "peer",
            "name",
            DUT_IF,
            "netns",
            dut.name(),
            "address",
            &mac(DUT_MAC),
        ])
        .context("could not create the veth pair")?;
        src.add_address(GEN_IF, GEN_IP.into(), 24)?;
        dut.add_address(DUT_IF, DUT_IP.into(), 24)?;
        dut.enable_gro(DUT_IF)
            .context("ethtool -K d0 gro on failed: is ethtool installed?")?;
        src.link_up(GEN_IF)?;
        dut.link_up(DUT_IF)?;
        dut.wait_link_up(DUT_IF, Duration::from_secs(5))?;
        // Static neighbours: no ARP traffic in the measurements, and replies
        // of the pass paths find their way back.
        src.ip(&[
            "neigh",
            "replace",
            &DUT_IP.to_string(),
            "lladdr",
            &mac(DUT_MAC),
            "dev",
            GEN_IF,
            "nud",
            "permanent",
        ])?;
        for ip in [GEN_IP, SSH_ALLOWED] {
            dut.ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac(GEN_MAC),
                "dev",
                DUT_IF,
                "nud",
                "permanent",
            ])?;
        }
        let holder = Holder::start(&dut)?;
        Ok(Self { holder, dut, src })
    }

    /// The DUT's counters now.
    ///
    /// # Errors
    /// When `/proc/PID/net` cannot be read.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        let at = Instant::now();
        let dev = std::fs::read_to_string(self.holder.proc_net("dev"))?;
        let snmp = std::fs::read_to_string(self.holder.proc_net("snmp"))?;
        Ok(Counters {
            at,
            rx: rx_packets(&dev, DUT_IF).context("d0 missing from the DUT's /proc/net/dev")?,
            delivered: snmp_field(&snmp, "Ip", "InDelivers")
                .context("no Ip InDelivers in /proc/net/snmp")?,
        })
    }
}

/// `sleep` inside the DUT namespace, killed on drop.
struct Holder {
    child: Child,
}

impl Holder {
    fn start(dut: &NetNs) -> anyhow::Result<Self> {
        let child = dut
            .cmd("sleep")
            .arg("86400")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("could not start a helper process in the DUT namespace")?;
        let holder = Self { child };
        // `ip netns exec` joins the namespace before exec'ing sleep; until
        // then /proc/PID/net shows the root namespace.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let dev = std::fs::read_to_string(holder.proc_net("dev")).unwrap_or_default();
            if rx_packets(&dev, DUT_IF).is_some() {
                return Ok(holder);
            }
            if Instant::now() > deadline {
                bail!("the helper process never showed up in the DUT namespace");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn proc_net(&self, file: &str) -> String {
        format!("/proc/{}/net/{file}", self.child.id())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps `kernel.bpf_stats_enabled` at 0 while it lives: statistics add
/// about 40 ns to every BPF program run, the generator's included, which
/// would distort every packet rate. Restores the old value on drop.
pub struct BpfStatsOff {
    previous: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStatsOff {
    /// # Errors
    /// When the sysctl is on and cannot be turned off.
    pub fn ensure() -> anyhow::Result<Self> {
        let now = std::fs::read_to_string(BPF_STATS).unwrap_or_default();
        if now.trim() == "1" {
            std::fs::write(BPF_STATS, "0")
                .context("could not turn kernel.bpf_stats_enabled off")?;
            println!(
                "xtask: kernel.bpf_stats_enabled was 1; off during the benchmark (it adds ~40 ns to every BPF run)"
            );
            return Ok(Self {
                previous: Some(now),
            });
        }
        Ok(Self { previous: None })
    }

    /// Whether the statistics are off now (checked before every rate measurement).
    pub fn is_off() -> bool {
        std::fs::read_to_string(BPF_STATS).is_ok_and(|s| s.trim() != "1")
    }
}

impl Drop for BpfStatsOff {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            let _ = std::fs::write(BPF_STATS, previous.trim());
        }
    }
}

pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Received packets of `interface` in `/proc/net/dev` text.
fn rx_packets(dev: &str, interface: &str) -> Option<u64> {
    dev.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        (name.trim() == interface).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
    })
}

/// A field of `/proc/net/snmp`: a header line and a value line per protocol.
fn snmp_field(snmp: &str, protocol: &str, field: &str) -> Option<u64> {
    let prefix = format!("{protocol}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let header = lines.next()?;
    let values = lines.next()?;
    let at = header.split_whitespace().position(|f| f == field)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_parsers_find_their_fields() {
        let dev = "Inter-|   Receive\n face |bytes    packets errs\n    lo:       0       0    0\n    d0: 6400 100 0 0\n";
        assert_eq!(rx_packets(dev, "d0"), Some(100), "d0 rx packets");
        assert_eq!(rx_packets(dev, "g0"), None, "absent interface");
        let snmp = "Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers\nIp: 2 64 10 0 0 0 0 0 7\nIcmp: InMsgs\nIcmp: 3\n";
        assert_eq!(
            snmp_field(snmp, "Ip", "InDelivers"),
            Some(7),
            "Ip InDelivers"
        );
        assert_eq!(snmp_field(snmp, "Icmp", "InMsgs"), Some(3), "Icmp InMsgs");
        assert_eq!(snmp_field(snmp, "Ip", "Nope"), None, "absent field");
    }
}
