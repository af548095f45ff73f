//! mDNS discovery: advertise `_kizuna._udp.local.` and dial what we find.
//!
//! TXT records: `node=<node id>`, `role=<role>`, `v=1` (frame protocol
//! version). Discovery is advisory: an announcement only makes us *try*; the
//! mutual TLS handshake with the announced node id as the expected server
//! name decides (C-11: a spoofed announcement fails the handshake and shows
//! up as `PeerRejected` with the address). Announcements with another `v`
//! are ignored with a log line (H-1). If multicast is unavailable the
//! transport logs it and keeps working with static peers (C-10).
//! An announcement never re-aims the dialer of a static peer, and at most
//! [`super::MAX_DISCOVERED_DIALERS`] dialers are started from
//! announcements, so spoofed ones cannot cut us off from headquarters or
//! grow tasks without bound.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use crdt::{NodeId, Role};
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

use super::{Inner, Notice};

pub const SERVICE_TYPE: &str = "_kizuna._udp.local.";
pub const TXT_VERSION: &str = "1";

pub(crate) struct Mdns {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Mdns {
    pub fn stop(self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

fn parse_role(s: &str) -> Option<Role> {
    Role::ALL.into_iter().find(|r| r.as_str() == s)
}

pub(crate) fn start(inner: &Arc<Inner>, instance: &str, port: u16) -> anyhow::Result<Mdns> {
    let daemon = ServiceDaemon::new().context("starting the mDNS daemon")?;
    let host = format!("{}.local.", inner.local_node);
    let props = [
        ("node", inner.local_node.as_str()),
        ("role", inner.local_role.as_str()),
        ("v", TXT_VERSION),
    ];
    let info = ServiceInfo::new(SERVICE_TYPE, instance, &host, "", port, &props[..])
        .context("building the mDNS announcement")?
        .enable_addr_auto();
    let fullname = info.get_fullname().to_string();
    daemon
        .register(info)
        .context("registering the mDNS service")?;
    let events = daemon.browse(SERVICE_TYPE).context("browsing mDNS")?;
    tracing::info!(instance, port, "mDNS advertising and browsing");
    let inner2 = inner.clone();
    inner.spawn(async move {
        let mut seen: std::collections::HashMap<NodeId, SocketAddr> = Default::default();
        while let Ok(ev) = events.recv_async().await {
            let ServiceEvent::ServiceResolved(svc) = ev else { continue };
            let node = svc.txt_properties.get_property_val_str("node").and_then(|s| NodeId::new(s).ok());
            let role = svc.txt_properties.get_property_val_str("role").and_then(parse_role);
            let version = svc.txt_properties.get_property_val_str("v");
            let (Some(node), Some(role)) = (node, role) else {
                tracing::debug!(service = %svc.fullname, "mDNS announcement without valid node/role ignored");
                continue;
            };
            if version != Some(TXT_VERSION) {
                tracing::warn!(peer = %node, version = ?version, "mDNS peer speaks another protocol version; upgrade needed");
                continue;
            }
            if node == inner2.local_node {
                continue;
            }
            // Prefer IPv4, then any; link-local IPv6 would need a scope id.
            let mut ips: Vec<IpAddr> = svc.addresses.iter().map(|a| a.to_ip_addr()).collect();
            ips.sort_by_key(|ip| (!ip.is_ipv4(), ip.is_loopback()));
            let Some(ip) = ips.into_iter().find(|ip| match ip {
                IpAddr::V4(_) => true,
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            }) else {
                continue;
            };
            let addr = SocketAddr::new(ip, svc.port);
            if seen.get(&node) == Some(&addr) {
                continue;
            }
            if seen.len() >= 4 * super::MAX_DISCOVERED_DIALERS {
                // Bounded: spoofed announcements for invented ids.
                seen.clear();
            }
            seen.insert(node.clone(), addr);
            tracing::info!(peer = %node, role = %role, %addr, "mDNS discovered peer");
            inner2.notice(Notice::Discovered { node: node.clone(), role, addr });
            inner2.ensure_dialer(node, addr, super::Origin::Mdns);
        }
    });
    Ok(Mdns { daemon, fullname })
}
